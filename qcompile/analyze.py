"""Outlier analysis: why a model quantizes badly, before compiling it.

Runs the float model over sample data in ONNX Runtime and, for every float activation a node
produces, keeps streaming statistics in fixed memory: max |x|, mean, standard deviation, kurtosis
(Bondarenko et al.'s outlier metrics) and the share of values beyond 6 standard deviations (from a
histogram, so the samples are never stored).
"""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from .calibration import StreamingHistogram  # noqa: E402
from .data import batched, iterate_feeds, model_input_specs  # noqa: E402
from .errors import QCompileError  # noqa: E402
from .graph import load_model  # noqa: E402
from . import __version__  # noqa: E402
from .artifact import MANIFEST_FILE, MARKER, staged_directory  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .report import HTML_HEAD, sensitivity_section, svg, table  # noqa: E402
from .runtime import make_session, with_extra_outputs  # noqa: E402

OUTLIER_SIGMAS = 6.0
ANALYSIS_BATCH = 16  # samples per ONNX Runtime call where the batch axis is dynamic


class StreamingMoments:
    """Count, mean and central moments 2-4 merged batch by batch (Pébay's parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2, self.m3, self.m4 = 0, 0.0, 0.0, 0.0, 0.0

    def update(self, values: np.ndarray) -> None:
        values = values.astype(np.float64).ravel()
        n_b = values.size
        if n_b == 0:
            return
        mean_b = values.mean()
        centred = values - mean_b
        squared = centred * centred  # products, not **: pow is several times slower
        m2_b, m3_b, m4_b = squared.sum(), (squared * centred).sum(), (squared * squared).sum()
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        m4 = (self.m4 + m4_b + delta**4 * n_a * n_b * (n_a**2 - n_a * n_b + n_b**2) / n**3
              + 6 * delta**2 * (n_a**2 * m2_b + n_b**2 * self.m2) / n**2 + 4 * delta * (n_a * m3_b - n_b * self.m3) / n)
        m3 = self.m3 + m3_b + delta**3 * n_a * n_b * (n_a - n_b) / n**2 + 3 * delta * (n_a * m2_b - n_b * self.m2) / n
        self.m2 += m2_b + delta**2 * n_a * n_b / n
        self.m3, self.m4 = m3, m4
        self.mean += delta * n_b / n
        self.count = n

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count else 0.0

    @property
    def kurtosis(self) -> float:
        """Pearson's kurtosis (3 for a Gaussian)."""
        return float(self.count * self.m4 / self.m2**2) if self.m2 > 0 else 0.0


@dataclass(frozen=True)
class TensorOutliers:
    tensor: str
    node: str
    op_type: str
    max_abs: float
    std: float
    kurtosis: float
    outlier_fraction: float  # share of values beyond OUTLIER_SIGMAS standard deviations of the mean


@dataclass(frozen=True)
class Analysis:
    tensors: list[TensorOutliers]  # graph order
    worst: str  # the tensor with the largest max |x| / std
    worst_histogram: tuple[np.ndarray, np.ndarray]  # its bin centres and counts


def analyze(model, samples) -> Analysis:
    """Outlier statistics of every float tensor a node produces."""
    model = load_model(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    float_tensors = {v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)
                     if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    produced = [(node, output) for node in model.graph.node for output in node.output if output in float_tensors]
    if not produced:
        raise QCompileError("the model produces no float tensors to analyse")
    names = [output for _, output in produced]
    session = make_session(with_extra_outputs(model, names))
    moments = {name: StreamingMoments() for name in names}
    histograms = {name: StreamingHistogram() for name in names}
    inputs = model_input_specs(model)
    batches = batched(iterate_feeds(samples, inputs), inputs, ANALYSIS_BATCH)
    for feed in tqdm(batches, desc="analysing", unit="batch", leave=False):
        for name, value in zip(names, session.run(names, feed)):
            moments[name].update(value)
            histograms[name].update(value)
    tensors = [_summarise(node, name, moments[name], histograms[name]) for node, name in produced]
    worst = max(tensors, key=lambda t: t.max_abs / t.std if t.std else 0.0).tensor
    return Analysis(tensors, worst, histograms[worst].centres_and_counts())


def analyze_sensitivity(model, samples, config: QuantConfig | None = None) -> list[dict]:
    """Per W8A8 node group (config: default W8A8), output SQNR with only it quantized and with only it
    float, and what keeping it float costs in run time, most sensitive first (as compile measures it)."""
    from . import phases

    state = phases.CompileState(model, config or QuantConfig(), samples)
    for phase in (phases.load, phases.normalize, phases.plan, phases.calibrate):
        phase(state)
    if not state.context.plan.integer:
        raise QCompileError("the model has no node group to quantize with this config")
    phases.measure_sensitivity(state)
    return [s.to_dict() for s in state.sensitivity]


def _summarise(node, name: str, moments: StreamingMoments, histogram: StreamingHistogram) -> TensorOutliers:
    centres, counts = histogram.centres_and_counts()
    far = np.abs(centres - moments.mean) > OUTLIER_SIGMAS * moments.std if moments.std > 0 else np.zeros_like(centres, bool)
    return TensorOutliers(name, node.name, node.op_type, max(abs(histogram.minimum), abs(histogram.maximum)),
                          moments.std, moments.kurtosis, float(counts[far].sum() / counts.sum()))


def write_report(analysis: Analysis, directory: str | Path, force: bool = False, inputs=(),
                 groups: list[dict] | None = None) -> Path:
    """outliers.json and report.html: per-tensor max |x| and kurtosis, the worst tensor's histogram;
    with `groups` (analyze_sensitivity), sensitivity.json and its table and plot; manifest.json marks
    the folder as qcompile's, so --force may replace it later."""
    with staged_directory(directory, force, inputs) as staging:
        (staging / MANIFEST_FILE).write_text(json.dumps({MARKER: __version__, "kind": "analysis"}) + "\n")
        (staging / "outliers.json").write_text(json.dumps([asdict(t) for t in analysis.tensors], indent=2) + "\n")
        if groups is not None:
            (staging / "sensitivity.json").write_text(json.dumps(groups, indent=2) + "\n")
        (staging / "report.html").write_text(_render(analysis, groups))
    return Path(directory)


def _render(analysis: Analysis, groups: list[dict] | None) -> str:
    worst = next(t for t in analysis.tensors if t.tensor == analysis.worst)
    ranked = sorted(analysis.tensors, key=lambda t: -t.kurtosis)
    return "\n".join([
        HTML_HEAD, "<h1>qcompile outlier analysis</h1>",
        f"<p>{len(analysis.tensors)} float tensors. Largest max |x| / std: <code>{html.escape(worst.tensor)}</code> "
        f"({worst.op_type}): max |x| {worst.max_abs:.3g} is {worst.max_abs / worst.std:.1f} std. Per-tensor 8-bit "
        "quantization spends most of its range on such outliers.</p>",
        svg(_per_tensor_plot(analysis.tensors)),
        svg(_histogram_plot(worst, *analysis.worst_histogram)),
        "<h2>Tensors by kurtosis</h2>",
        table(["tensor", "node", "op", "max |x|", "std", "kurtosis", f"share beyond {OUTLIER_SIGMAS:g} std"],
              [[t.tensor, t.node, t.op_type, f"{t.max_abs:.4g}", f"{t.std:.4g}", f"{t.kurtosis:.4g}",
                f"{t.outlier_fraction:.2e}"] for t in ranked]),
        *(sensitivity_section(groups) if groups is not None else []),
        "</body></html>\n",
    ])


def _per_tensor_plot(tensors: list[TensorOutliers]):
    figure, axes = plt.subplots(2, 1, figsize=(max(7, len(tensors) * 0.06), 5.5), sharex=True)
    positions = np.arange(len(tensors))
    axes[0].bar(positions, [t.max_abs for t in tensors], color="#3b6ea5")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("max |x|")
    axes[0].set_title("Per-tensor outlier metrics")
    axes[1].bar(positions, [t.kurtosis for t in tensors], color="#a53b3b")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("kurtosis")
    axes[1].set_xlabel("tensor (graph order)")
    figure.tight_layout()
    return figure


def _histogram_plot(tensor: TensorOutliers, centres: np.ndarray, counts: np.ndarray):
    figure, axis = plt.subplots(figsize=(7, 3))
    axis.semilogy(centres, counts, drawstyle="steps-mid", color="#3b6ea5")
    axis.set_title(f"Histogram of {tensor.tensor} ({tensor.op_type})")
    axis.set_xlabel("value")
    axis.set_ylabel("count")
    figure.tight_layout()
    return figure
