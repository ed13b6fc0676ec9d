"""report.html: the per-layer table, the plan, and a plot of per-layer output SQNR."""
from __future__ import annotations

import html
import io

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Fixed SVG ids and no date, so the same compile writes the same bytes.
matplotlib.rcParams["svg.hashsalt"] = "qcompile"


HTML_HEAD = ("<!doctype html><html><head><meta charset='utf-8'><title>qcompile report</title>"
         "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style></head><body>")


def render(manifest: dict, figures: tuple[str, ...] = ()) -> str:
    verification = manifest.get("verification") or {}
    layers = verification.get("layers", [])
    parts = [
        HTML_HEAD,
        f"<h1>qcompile report</h1><p>qcompile {html.escape(manifest['qcompile_version'])}; "
        f"config <code>{html.escape(str(manifest['config']))}</code></p>",
    ]
    if verification:
        parts.append(f"<h2>Verification on {verification['samples']} held-out samples</h2>")
        parts.append(table(["output", "SQNR (dB)", "mean cosine"],
                            [[n, v["sqnr_db"], v["cosine"]] for n, v in verification["outputs"].items()]))
    deployed = manifest.get("deployed")
    if deployed and deployed["by_op"]:
        parts.append(f"<h2>As deployed: {html.escape(deployed['summary'])}</h2>")
        parts.append("<p>Read from the graph ONNX Runtime optimizes for this model (CPU provider).</p>")
        if deployed["float"]:
            parts.append(table(["compute node left in float", "runs as"], [[n, k] for n, k in deployed["float"].items()]))
    if layers:
        parts.append(f"<h2>Per-layer output SQNR (probe on {verification['layer_samples']} samples)</h2>")
        parts.append(_sqnr_plot(layers))
        parts.append(table(["node", "op", "output", "SQNR (dB)"],
                            [[l["node"], l["op_type"], l["tensor"], l["sqnr_db"]] for l in layers]))
    if manifest.get("float_search"):
        parts.extend(float_search_section(manifest["float_search"]))
    if manifest.get("sensitivity"):
        parts.extend(sensitivity_section(manifest["sensitivity"]))
    if manifest.get("lut_weights"):
        parts.extend(_lut_section(manifest["lut_weights"], figures))
    plan = manifest["plan"]
    parts.append(f"<h2>Quantized tensors ({len(plan['tensors'])})</h2>")
    parts.append(table(["tensor", "kind", "dtype", "axis", "scale", "zero point", "why"],
                        [[t["tensor"], t["kind"], t["dtype"], t["axis"], t["scale"], t["zero_point"], t["reason"]]
                         for t in plan["tensors"]]))
    parts.append(f"<h2>Kept in float ({len(plan['kept_float'])})</h2>")
    parts.append(table(["node", "op", "why"], [[s["node"], s["op_type"], s["reason"]] for s in plan["kept_float"]]))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_qat(manifest: dict) -> str:
    """The report of a `qcompile.qat.convert` artifact: learned quantizers and the check against PyTorch."""
    check = manifest["verification_against_pytorch"]
    tensors = manifest["plan"]["tensors"]
    return "\n".join([
        HTML_HEAD,
        f"<h1>qcompile QAT report</h1><p>qcompile {html.escape(manifest['qcompile_version'])}</p>",
        "<h2>ONNX Runtime vs the PyTorch fake-quant model</h2>",
        table(["samples", "max |difference|", "one output step"],
               [[check["samples"], check["max_abs_difference"], check["output_step_bound"]]]),
        f"<h2>Learned quantizers ({len(tensors)})</h2>",
        table(["module", "dtype", "per channel", "scale"],
               [[t["module"], t["dtype"], t["per_channel"], t["scale"]] for t in tensors]),
        "</body></html>\n",
    ])


def _lut_section(summary: dict, figures: tuple[str, ...]) -> list[str]:
    sqnr = "" if summary["sqnr_db"] is None else f", output SQNR {summary['sqnr_db']:.2f} dB"
    width = "a width per layer" if summary["bits"] is None else f"{summary['bits']} bits"
    parts = [f"<h2>Lookup-table weights: {html.escape(summary['format'])}, {width}{sqnr}</h2>",
             f"<p>Fitted to {html.escape(summary['fit'])}; candidates scored by {html.escape(summary['scored_by'])}.</p>"]
    tried = [[t["bits"], f["function"], f["sqnr_db"], f["mse"]] for t in summary["tried"] for f in t["per_function"]]
    if tried:
        parts.append("<h3>Every function, one per model</h3>")
        parts.append(table(["bits", "function", "output SQNR (dB)", "mean weight MSE"], tried))
    mixed = summary.get("mixed")
    if mixed:
        parts.append(f"<h3>Formats per layer: {mixed['bytes_fraction']:.4f} of the float weight bytes "
                     f"({mixed['bytes']} of {mixed['float_bytes']}), {mixed['kept_float']} weights kept float</h3>")
        parts.append(table(["tensor", "op", "format", "bytes", "gain (output noise per layer error)"],
                           [[c["tensor"], c["op_type"], c["format"], c["bytes"],
                             f"{c['gain']:.3g}" if isinstance(c["gain"], float) else c["gain"]]
                            for c in mixed["choices"]]))
    parts.append("<h3>Chosen per layer</h3>")
    parts.append(table(["tensor", "op", "rows x k", "bits", "quantizer", "tables per row", "weight MSE"],
                       [[l["tensor"], l["op_type"], f"{l['rows']} x {l['k']}", l["bits"], l["quantizer"],
                         l["blocks"], l["mse"]] for l in summary["layers"]]))
    parts.extend(figures)
    return parts


def float_search_section(search: dict) -> list[str]:
    """The node groups kept float to reach the target, and the sets the search measured on the way."""
    metric = search.get("metric")
    goal, key = ((f"Target metric {metric['required']:.6g} (float {metric['float']:.6g} - {metric['max_drop']:g})", "metric")
                 if metric else (f"Target output SQNR {search['target_db']:g} dB", "sqnr_db"))
    parts = [f"<h2>{goal}: {len(search['floated'])} node groups kept float</h2>",
             f"<p>Output SQNR on calibration data (fake-quantized probe): {search['full_db']} dB with every group "
             f"integer, {search['sqnr_db']} dB as compiled.</p>"]
    if metric:
        parts.append(f"<p>Target metric as compiled: {metric['reached']:.6g}, after {metric['evaluations']} deployed "
                     "models were measured.</p>")
    if search["floated"]:
        parts.append(table(["node group", "why float"], [[node, why] for node, why in search["floated"].items()]))
    if search["front"]:
        finite = [p for p in search["front"] if isinstance(p[key], float)]
        figure, axes = plt.subplots(figsize=(6, 3.2))
        axes.scatter([p["cost_us"] for p in finite], [p[key] for p in finite], color="#3b6ea5", s=12)
        axes.axhline(metric["required"] if metric else search["target_db"], color="#a53b3b", linewidth=1, label="target")
        parts.append(_labelled(figure, axes, "run time the float groups add (us, measured)",
                               "target metric" if metric else "output SQNR (dB)", "Sets of float groups the search measured"))
    return parts


def sensitivity_section(groups: list[dict]) -> list[str]:
    """Per node group: output SQNR with only it quantized, and with only it float; sorted by the latter."""
    figure, axes = plt.subplots(figsize=(max(6, len(groups) * 0.12), 3.4))
    positions = np.arange(len(groups))
    for key, label, color in (("float_alone_db", "only this group float", "#3b6ea5"),
                              ("quantized_alone_db", "only this group quantized", "#a53b3b")):
        values = [g[key] if isinstance(g[key], float) else np.nan for g in groups]
        axes.plot(positions, values, "o", markersize=3, label=label, color=color)
    plot = _labelled(figure, axes, "node group (most sensitive first)", "output SQNR (dB)",
                     "Sensitivity of the output to each node group")
    return [f"<h2>Sensitivity ({len(groups)} node groups)</h2>", plot,
            table(["node group", "op", "kernel", "SQNR, only it float (dB)", "SQNR, only it quantized (dB)",
                   "float costs (us per run)"],
                  [[g["node"], g["op_type"], g["kernel"], g["float_alone_db"], g["quantized_alone_db"], g["cost_us"]]
                   for g in groups])]


def sorted_weights_figure(samples: list[tuple[str, np.ndarray, np.ndarray]]) -> str:
    """Seed 003 Figure 1 style: each sample's sorted weights and their dequantized values."""
    figure, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 3.0), squeeze=False)
    for axis, (label, weights, dequantized) in zip(axes[0], samples):
        order = np.argsort(weights)
        axis.plot(weights[order], label="sorted weights", color="#999999")
        axis.plot(dequantized[order], label="quantized", color="#3b6ea5", linewidth=1)
        axis.set_title(label, fontsize=8)
        axis.set_xlabel("rank")
    axes[0][0].legend(fontsize=7)
    figure.suptitle("One row per layer: sorted weights and the fitted quantizer's values", fontsize=9)
    figure.tight_layout()
    return svg(figure)


def front_figure(mixed: dict) -> str:
    """--weights auto: the front the search walked, stored bytes against predicted and measured output SQNR
    (an infinite SQNR, stored as "inf", is left out)."""
    points = mixed["front"] + ([mixed["detour"]] if mixed["detour"] else [])
    front = [p for p in mixed["front"] if isinstance(p["predicted_sqnr_db"], float)]
    measured = [p for p in points if isinstance(p["measured_sqnr_db"], float)]
    figure, axes = plt.subplots(figsize=(6, 3.2))
    axes.plot([p["bytes_fraction"] for p in front], [p["predicted_sqnr_db"] for p in front], color="#999999",
              label="predicted (additive noise)")
    axes.scatter([p["bytes_fraction"] for p in measured], [p["measured_sqnr_db"] for p in measured], color="#3b6ea5",
                 label="measured (nearest-entry codes)")
    axes.axvline(mixed["bytes_fraction"], color="#c0392b", linewidth=1, label="chosen")
    return _labelled(figure, axes, "stored bytes / float weight bytes", "output SQNR (dB)",
                     "--weights auto: the front of per-layer formats, on calibration data")


def _labelled(figure, axes, xlabel: str, ylabel: str, title: str) -> str:
    """A one-axes plot with its labels, title and legend, as inline SVG."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return svg(figure)


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _sqnr_plot(layers: list[dict]) -> str:
    # An exact layer has infinite SQNR (stored as "inf"): draw it at the top of the others.
    finite = [l["sqnr_db"] for l in layers if isinstance(l["sqnr_db"], float)]
    ceiling = max(finite, default=0.0) + 10.0
    values = [l["sqnr_db"] if isinstance(l["sqnr_db"], float) else ceiling for l in layers]
    figure, axes = plt.subplots(figsize=(max(6, len(values) * 0.12), 3.2))
    axes.bar(range(len(values)), values, color="#3b6ea5")
    axes.set_xlabel("quantized layer (graph order)")
    axes.set_ylabel("output SQNR (dB)")
    axes.set_title("Per-layer output SQNR, quantized vs float")
    figure.tight_layout()
    return svg(figure)


def svg(figure) -> str:
    """The figure as inline SVG, closed afterwards; no date, so the bytes are reproducible."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]
