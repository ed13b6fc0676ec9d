"""Residual Add + LayerNormalization in ONNX Runtime: as written (its optimizer fuses the pair into
SkipLayerNormalization) against the same sum written as Sum (left as Sum + LayerNormalization),
at the residual-stream shapes of the zoo's transformers. Interleaved timing, 2 threads. This is the
measurement behind passes/sum_before_layer_norm.py.

    .venv/bin/python benchmarks/skip_layer_norm.py      # ~30 s
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.runtime import make_session

SHAPES = ((1, 64, 384), (1, 128, 384), (1, 197, 384), (1, 128, 768))
ROUNDS, RUNS = 20, 200


def model(op: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    hidden = shape[-1]
    nodes = [helper.make_node(op, ["a", "b"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
                               numpy_helper.from_array(np.zeros(hidden, np.float32), "beta")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def kernels(candidate: onnx.ModelProto) -> str:
    with tempfile.TemporaryDirectory() as folder:
        make_session(candidate, optimized_path=Path(folder) / "o.onnx")
        return " + ".join(node.op_type for node in onnx.load(str(Path(folder) / "o.onnx")).graph.node)


def main() -> None:
    rng = np.random.default_rng(0)
    print("| shape | Add: ONNX Runtime runs | us | Sum: ONNX Runtime runs | us | Sum / Add |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        feed = {name: rng.standard_normal(shape).astype(np.float32) for name in "ab"}
        models = {op: model(op, shape) for op in ("Add", "Sum")}
        sessions = {op: make_session(m) for op, m in models.items()}
        outputs = {op: s.run(None, feed)[0] for op, s in sessions.items()}
        np.testing.assert_allclose(outputs["Sum"], outputs["Add"], rtol=1e-5, atol=1e-5)
        times = {op: [] for op in sessions}
        for _ in range(ROUNDS):
            for op, session in sessions.items():
                start = time.perf_counter()
                for _ in range(RUNS):
                    session.run(None, feed)
                times[op].append((time.perf_counter() - start) / RUNS * 1e6)
        add, total = float(np.median(times["Add"])), float(np.median(times["Sum"]))
        print(f"| {'x'.join(map(str, shape))} | {kernels(models['Add'])} | {add:.1f} | {kernels(models['Sum'])} | {total:.1f} "
              f"| {total / add:.2f} |")


if __name__ == "__main__":
    main()
