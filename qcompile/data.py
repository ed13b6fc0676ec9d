"""Calibration and verification data: read any supported source, check it against the model.

Sources: an `.npz` file (arrays keyed by input name, leading sample axis), a folder of `.npz`
files, a Python iterable of `{input_name: array}` feeds, or an ONNX Runtime
`CalibrationDataReader`. Everything becomes a stream of checked feeds, one model call each, so
nothing holds more than one file in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from .errors import QCompileError


@dataclass(frozen=True)
class InputSpec:
    """A graph input as the data must match it: dims are ints, or None where the model is dynamic."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]

    @property
    def batch_is_dynamic(self) -> bool:
        return bool(self.dims) and self.dims[0] is None


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        # A dim without a positive value is dynamic (PaddlePaddle writes the batch dim as -1).
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def iterate_feeds(source, specs: list[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    """Yield checked feeds from `source`; raise QCompileError on the first bad one."""
    count = 0
    for origin, feed in _raw_feeds(source, specs):
        yield check_feed(feed, specs, origin)
        count += 1
    if count == 0:
        raise QCompileError("the calibration data holds no samples")


def check_feed(feed, specs: list[InputSpec], origin: str) -> dict[str, np.ndarray]:
    if not isinstance(feed, dict):
        raise QCompileError(f"{origin}: expected a dict of input name -> array, got {type(feed).__name__}")
    expected = {spec.name for spec in specs}
    missing, extra = sorted(expected - set(feed)), sorted(set(feed) - expected)
    if missing:
        raise QCompileError(f"{origin}: missing model inputs: {', '.join(missing)}")
    if extra:
        raise QCompileError(f"{origin}: names that are not model inputs: {', '.join(extra)}")
    checked = {}
    for spec in specs:
        array = np.asarray(feed[spec.name])
        if spec.dtype == object and array.dtype.kind in "US":  # strings: an .npz holds them as str/bytes arrays
            array = array.astype(object)
        if array.dtype != spec.dtype:
            raise QCompileError(f"{origin}: input {spec.name!r} has dtype {array.dtype}, the model wants {spec.dtype}")
        if array.ndim != len(spec.dims) or any(d is not None and d != a for d, a in zip(spec.dims, array.shape)):
            wanted = "x".join("?" if d is None else str(d) for d in spec.dims)
            raise QCompileError(f"{origin}: input {spec.name!r} has shape {array.shape}, the model wants {wanted}")
        if array.dtype.kind == "f" and np.isnan(array).any():  # +-inf is legitimate (attention masks)
            raise QCompileError(f"{origin}: input {spec.name!r} contains NaN")
        checked[spec.name] = array
    return checked


def _raw_feeds(source, specs: list[InputSpec]) -> Iterator[tuple[str, dict]]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise QCompileError(f"{path}: folder holds no .npz files")
            for file in files:
                yield from _npz_feeds(file, specs)
        elif path.is_file():
            yield from _npz_feeds(path, specs)
        else:
            raise QCompileError(f"{path}: no such file or folder")
    elif hasattr(source, "get_next"):  # onnxruntime.quantization.CalibrationDataReader
        index = 0
        while (feed := source.get_next()) is not None:
            yield f"reader sample {index}", feed
            index += 1
    elif isinstance(source, Iterable) and not isinstance(source, (dict, np.ndarray)):
        for index, feed in enumerate(source):
            yield f"sample {index}", feed
    else:
        raise QCompileError(
            f"unsupported calibration data of type {type(source).__name__}: give an .npz file, a folder "
            "of .npz files, an iterable of {input name: array} dicts, or a CalibrationDataReader"
        )


def _npz_feeds(path: Path, specs: list[InputSpec]) -> Iterator[tuple[str, dict]]:
    """Split an npz's arrays along their leading sample axis into one feed per sample.

    An array with one more axis than the model input holds samples of full input shape; one with
    the same rank is a batch whose rows are samples (kept as batches of one).
    """
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # numpy raises several types for a file that is not an npz
        raise QCompileError(f"{path}: not a readable .npz file ({error})") from None
    ranks = {spec.name: len(spec.dims) for spec in specs}
    counts = {name: len(array) if array.ndim else 0 for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        raise QCompileError(f"{path}: arrays hold different numbers of samples: {counts}")
    for index in range(next(iter(counts.values()), 0)):
        feed = {}
        for name, array in arrays.items():
            feed[name] = array[index] if array.ndim == ranks.get(name, -1) + 1 else array[index : index + 1]
        yield f"{path.name} sample {index}", feed


def batched(feeds: Iterable[dict], specs: list[InputSpec], batch_size: int) -> Iterator[dict]:
    """Concatenate consecutive feeds along the batch axis where the model's batch axis is dynamic
    and their other dims agree; otherwise pass feeds through one by one."""
    if batch_size == 1 or not all(spec.batch_is_dynamic for spec in specs):
        yield from feeds
        return
    pending: list[dict] = []
    for feed in feeds:
        if pending and (len(pending) == batch_size or _trailing_shapes(feed) != _trailing_shapes(pending[0])):
            yield _concatenate(pending)
            pending = []
        pending.append(feed)
    if pending:
        yield _concatenate(pending)


def _trailing_shapes(feed: dict) -> tuple:
    return tuple((name, array.shape[1:]) for name, array in sorted(feed.items()))


def _concatenate(feeds: list[dict]) -> dict:
    if len(feeds) == 1:
        return feeds[0]
    return {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}


def split_holdout(source, specs: list[InputSpec], fraction: float):
    """(calibration feeds, verification feeds): the last `fraction` of the samples is held out
    (none when fraction is 0, which skips verification)."""
    feeds = list(iterate_feeds(source, specs))
    held = int(len(feeds) * fraction)
    return (feeds[:-held], feeds[-held:]) if held else (feeds, [])
