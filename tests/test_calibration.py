import numpy as np

from qcompile import numerics
from qcompile.calibration import StreamingHistogram, activation_params, weight_params
from qcompile.plan import TensorSpec


def activation_spec(**kwargs):
    return TensorSpec("x", "activation", "uint8", None, (("n", 0),), "test", **kwargs)


def test_histogram_keeps_every_count_in_constant_memory(rng):
    histogram = StreamingHistogram(bins=1024)
    batches = [rng.normal(scale=scale, size=5000).astype(np.float32) for scale in (0.1, 1.0, 10.0, 0.5, 100.0)]
    for batch in batches:
        histogram.update(batch)
        assert histogram.counts.shape == (1024,)
    everything = np.concatenate(batches)
    assert histogram.counts.sum() == everything.size
    assert histogram.minimum == everything.min() and histogram.maximum == everything.max()
    edges = np.linspace(-histogram.radius, histogram.radius, 1025)
    reference, _ = np.histogram(everything, bins=edges)
    # Values on a bin edge may land one bin over after merges; the mass per region must agree.
    np.testing.assert_allclose(np.cumsum(histogram.counts), np.cumsum(reference), atol=len(batches))


def test_percentile_range_matches_numpy(rng):
    values = rng.laplace(size=200_000).astype(np.float32)
    histogram = StreamingHistogram()
    for chunk in np.split(values, 10):
        histogram.update(chunk)
    low, high = histogram.percentile_range(99.9)
    width = 2 * histogram.radius / histogram.bins
    assert abs(low - np.percentile(values, 0.05)) < 2 * width
    assert abs(high - np.percentile(values, 99.95)) < 2 * width


def test_mse_on_histogram_matches_mse_on_raw_values(rng):
    values = np.concatenate([rng.normal(size=100_000), rng.normal(scale=40, size=20)]).astype(np.float32)
    histogram = StreamingHistogram()
    for chunk in np.array_split(values, 7):
        histogram.update(chunk)
    params = activation_params(activation_spec(), histogram, "mse", 99.99)
    raw_scale, raw_zero_point = numerics.mse_params(values, numerics.UINT8)
    ones = np.ones_like(values, dtype=np.float64)
    from_histogram = numerics.weighted_mse(values, ones, params.scale, params.zero_point.astype(np.float64), numerics.UINT8)
    from_raw = numerics.weighted_mse(values, ones, raw_scale, raw_zero_point, numerics.UINT8)
    assert from_histogram < 1.03 * from_raw


def test_fixed_range_needs_no_statistics():
    params = activation_params(activation_spec(fixed_range=(0.0, 1.0)), None, "mse", 99.99)
    assert params.scale == np.float32(1 / 255) and params.zero_point == 0
    assert params.zero_point.dtype == np.uint8 and params.scale.shape == ()


def test_weight_params_are_per_output_channel(rng):
    weight = rng.normal(size=(16, 8)) * np.linspace(0.1, 10, 8)  # MatMul weight (K, N): channels on axis 1
    params = weight_params(weight, 1, numerics.INT8_SYMMETRIC, "minmax")
    np.testing.assert_allclose(params.scale, np.abs(weight).max(axis=0) / 127, rtol=1e-6)
    assert params.zero_point.dtype == np.int8 and not params.zero_point.any()
