import numpy as np
import pytest
from onnxruntime.quantization import CalibrationDataReader

from qcompile.data import InputSpec, batched, iterate_feeds
from qcompile.errors import QCompileError

SPECS = [InputSpec("ids", np.dtype(np.int64), (None, 6)), InputSpec("x", np.dtype(np.float32), (None, 6, 2))]


def samples(count=5):
    rng = np.random.default_rng(0)
    return {"ids": rng.integers(0, 9, (count, 6)), "x": rng.normal(size=(count, 6, 2)).astype(np.float32)}


def feeds_of(arrays):
    return [{"ids": arrays["ids"][i : i + 1], "x": arrays["x"][i : i + 1]} for i in range(len(arrays["ids"]))]


def assert_same_feeds(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], e[name])


def test_every_source_form_gives_the_same_feeds(tmp_path):
    arrays = samples()
    expected = feeds_of(arrays)
    np.savez(tmp_path / "calib.npz", **arrays)
    folder = tmp_path / "folder"
    folder.mkdir()
    np.savez(folder / "a.npz", ids=arrays["ids"][:2], x=arrays["x"][:2])
    np.savez(folder / "b.npz", ids=arrays["ids"][2:], x=arrays["x"][2:])
    # A sample axis in front of the full input shape (rank + 1) is the same data.
    np.savez(tmp_path / "stacked.npz", ids=arrays["ids"][:, None], x=arrays["x"][:, None])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(expected)

        def get_next(self):
            return next(self.feeds, None)

    for source in (tmp_path / "calib.npz", folder, tmp_path / "stacked.npz", expected, iter(expected), Reader()):
        assert_same_feeds(list(iterate_feeds(source, SPECS)), expected)


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.pop("x"), "missing model inputs: x"),
    (lambda f: f.update(extra=np.zeros(1)), "names that are not model inputs: extra"),
    (lambda f: f.update(x=f["x"].astype(np.float64)), "has dtype float64, the model wants float32"),
    (lambda f: f.update(x=f["x"][:, :5]), r"has shape \(1, 5, 2\), the model wants \?x6x2"),
    (lambda f: f["x"].__setitem__((0, 0, 0), np.nan), "contains NaN"),
])
def test_bad_samples_are_named_errors(mutate, message):
    feeds = feeds_of(samples())
    mutate(feeds[3])
    with pytest.raises(QCompileError, match=f"sample 3: .*{message}"):
        list(iterate_feeds(feeds, SPECS))


def test_empty_and_unsupported_sources(tmp_path):
    with pytest.raises(QCompileError, match="holds no samples"):
        list(iterate_feeds([], SPECS))
    np.savez(tmp_path / "empty.npz", ids=np.zeros((0, 6), np.int64), x=np.zeros((0, 6, 2), np.float32))
    with pytest.raises(QCompileError, match="holds no samples"):
        list(iterate_feeds(tmp_path / "empty.npz", SPECS))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(QCompileError, match="not a readable .npz"):
        list(iterate_feeds(tmp_path / "junk.npz", SPECS))
    with pytest.raises(QCompileError, match="unsupported calibration data"):
        list(iterate_feeds(42, SPECS))


def test_batching_concatenates_on_dynamic_batch_axis_only():
    feeds = feeds_of(samples(5))
    batches = list(batched(feeds, SPECS, 2))
    assert [len(b["ids"]) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), np.concatenate([f["x"] for f in feeds]))
    fixed = [InputSpec("ids", np.dtype(np.int64), (1, 6)), SPECS[1]]
    assert len(list(batched(feeds, fixed, 2))) == 5
