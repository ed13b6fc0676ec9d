"""The `qcompile` command line: compile, run, export."""
from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import click
import numpy as np

from .config import ACTIVATION_FORMATS, CALIBRATION_METHODS, EXECUTOR_NAMES, FITS, SELECTIONS, QuantConfig
from .errors import BelowFloorError, InternalError, QCompileError, first_line

# Where more than this share of the linear compute stays float, the summary says so loudly.
FLOAT_SHARE_WARNING = 0.25
SHOWN_UNFUSED = 5  # compute nodes ONNX Runtime left in float, named on the console


@click.group()
@click.version_option(package_name="qcompile")
@click.option("--debug", is_flag=True, help="On an internal error, print the full traceback.")
@click.pass_obj
def cli(settings: dict, debug: bool) -> None:
    """Ahead-of-time quantization compiler for ONNX models.

    Exit codes: 0 done, 2 a problem with the input (one line), 3 an internal error (one line;
    --debug prints the traceback), 4 compile --strict and the output SQNR below the floor.
    """
    settings["debug"] = debug


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration data: an .npz file or a folder of them.")
@click.option("--verify-data", type=click.Path(path_type=Path),
              help="Held-out samples for verification (default: hold out part of --calib).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Artifact directory to write.")
@click.option("--weights", default="int8", show_default=True,
              help="int8 | int4 (QDQ; int4 with --acts none or --block, and int2..int7: packed affine lookup-table "
                   "weights) | nl | nlB (PTNQ non-linear B-bit) | table | tableB (free B-bit float16 tables) | none | "
                   "auto (a format per layer, for --target-sqnr or --size-budget).")
@click.option("--bits", help="Code width for --weights nl or table: B; for nl also LOW-HIGH to search widths "
                             "(with --target-sqnr).")
@click.option("--block", type=int, help="Affine or free lookup tables: one table per block of this many inputs.")
@click.option("--fit", type=click.Choice(FITS), default="output", show_default=True,
              help="Fit lookup-table weights to each layer's output error on --calib data, or to the weights alone.")
@click.option("--target-sqnr", type=float,
              help="Output SQNR (dB) to reach. W8A8: node groups stay float until it holds (default 20; 0: none float). "
                   "--weights auto: with the fewest bytes. --weights nl --bits LOW-HIGH: the lowest width reaching it.")
@click.option("--size-budget", type=float, help="--weights auto: the best output SQNR within this fraction of the float "
                                                "weight bytes.")
@click.option("--sqnr-floor", type=float, default=10.0, show_default=True,
              help="Warn (with --strict: exit 4, nothing written) when the held-out output SQNR falls below this.")
@click.option("--strict", is_flag=True, help="An output below --sqnr-floor is an error (exit 4), not a warning.")
@click.option("--functions", help="Comma-separated PTNQ pool functions to search (default: the whole pool).")
@click.option("--lut-ops", help="Comma-separated ops whose weights become lookup tables "
                                  "(default: MatMul,Gemm,Conv,Gather; Gather = embedding tables).")
@click.option("--function-depth", type=click.IntRange(0, 1), default=0, show_default=True,
              help="PTNQ pool depth: 1 adds compositions f(g(x)).")
@click.option("--select", type=click.Choice(SELECTIONS), default="layer", show_default=True,
              help="Choose the PTNQ function per layer or per model.")
@click.option("--executor", type=click.Choice(EXECUTOR_NAMES), default="local", show_default=True,
              help="Where PTNQ fitting runs (ray: a Ray cluster; RAY_ADDRESS or a local one).")
@click.option("--workers", type=int, help="Processes for --executor local (default: all cores).")
@click.option("--acts", type=click.Choice(ACTIVATION_FORMATS), default="int8", show_default=True,
              help="int8: ranges calibrated ahead of time (QDQ); dynamic: with nl/table/affine weights, MatMul inputs "
                   "quantized at run time against int8 tables (ONNX Runtime's DynamicQuantizeMatMul); none: float.")
@click.option("--calib-method", type=click.Choice(CALIBRATION_METHODS), default="mse", show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For --calib-method percentile.")
@click.option("--no-attention", is_flag=True, help="Keep attention's activation x activation MatMuls in float.")
@click.option("--no-residual", is_flag=True, help="Keep Adds of two activations (residual Adds) in float.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--explain", is_flag=True, help="Print what each pass found, or why a pattern did not match.")
def compile(model, calib, verify_data, output, weights, bits, block, fit, target_sqnr, size_budget, sqnr_floor, strict,
            functions, lut_ops, function_depth, select, executor, workers, acts, calib_method, percentile, no_attention,
            no_residual, force, explain):
    """Quantize MODEL (an .onnx file) and write an artifact directory."""
    from .artifact import check_output
    from .compiler import QCompileWarning, compile as compile_model

    check_output(output, force, inputs=(model, calib, verify_data))  # fail before the slow part
    weights, bit_range = _weight_format(weights, bits, block, acts)
    config = QuantConfig(weights=weights, acts=acts, calib_method=calib_method, percentile=percentile,
                         quantize_attention=not no_attention, quantize_residual_adds=not no_residual, bits=bit_range,
                         block=block, target_sqnr=target_sqnr, size_budget=size_budget, function_depth=function_depth,
                         functions=tuple(functions.split(",")) if functions else None, select=select,
                         **({"lut_ops": tuple(lut_ops.split(","))} if lut_ops else {}),
                         executor=executor, workers=workers, fit=fit, sqnr_floor=sqnr_floor, strict=strict)
    with warnings.catch_warnings():  # the summary prints them
        warnings.simplefilter("ignore", QCompileWarning)
        artifact = compile_model(model, config, calib=calib, verify_data=verify_data)
    artifact.save(output, force=force)
    if explain:
        for note in artifact.manifest["explain"]:
            click.echo(f"{note['pass']}: {note['node']}: {note['note']}")
    _print_summary(artifact.manifest, output)


def _weight_format(text: str, bits: str | None, block: int | None, acts: str) -> tuple[str, tuple[int, int]]:
    """--weights and --bits -> (QuantConfig.weights, bits)."""
    bit_range = _bit_range(bits) if bits else None
    if text == "auto":
        if bits:
            raise QCompileError("--weights auto chooses the bits of every layer: drop --bits")
        return text, (4, 4)
    if text in ("int8", "int4", "none") and block is None and (text != "int4" or acts == "int8"):
        if bits:
            raise QCompileError(f"--bits applies to lookup-table weights (nl, table, int2..int7), not --weights {text}")
        return text, (4, 4)
    for prefix, kind in (("nl", "nl"), ("table", "table"), ("int", "affine")):
        if text.startswith(prefix) and (text == prefix != "int" or text[len(prefix):].isdigit()):
            if text == prefix:
                return kind, bit_range or (4, 4)
            width = int(text[len(prefix):])
            if bit_range not in (None, (width, width)):
                raise QCompileError(f"--weights {text} already sets {width} bits; --bits {bits} disagrees")
            return kind, (width, width)
    raise QCompileError(f"--weights must be int8, int4, intB, nl, nlB, table, tableB, none or auto (B = 2..8); "
                        f"got {text!r}")


def _bit_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    if not low.isdigit() or (high and not high.isdigit()):
        raise QCompileError(f"--bits must be B or LOW-HIGH, like 4 or 4-8; got {text!r}")
    return int(low), int(high or low)


@cli.command("build-ops")
@click.option("--include", type=click.Path(path_type=Path),
              help="ONNX Runtime's C/C++ include folder (default: $QCOMPILE_ORT_INCLUDE, else Debian's headers).")
def build_ops(include):
    """Build qcompile's ONNX Runtime custom-op library from csrc/."""
    from .lut import ops

    click.echo(f"built {ops.build_library(include)}")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--inputs", type=click.Path(path_type=Path), required=True, help=".npz of model inputs by name.")
@click.option("--outputs", type=click.Path(path_type=Path), required=True, help=".npz to write outputs to.")
def run(artifact, inputs, outputs):
    """Run a compiled ARTIFACT on the inputs in an .npz file."""
    from .artifact import Artifact
    from .data import check_feed, model_input_specs

    loaded = Artifact.load(artifact)
    try:
        archive = np.load(inputs, allow_pickle=False)
        feed = {name: archive[name] for name in archive.files}
    except Exception as error:
        raise QCompileError(f"{inputs}: not a readable .npz file ({error})") from None
    feed = check_feed(feed, model_input_specs(loaded.model), str(inputs))
    try:
        session = loaded.session()
        names = [output.name for output in session.get_outputs()]
        results = session.run(names, feed)
    except QCompileError:
        raise
    except Exception as error:  # onnxruntime's own exception types: a model it rejects, data it cannot run
        raise QCompileError(f"{artifact}: ONNX Runtime cannot run it: {first_line(error)}") from None
    try:
        np.savez(outputs, **dict(zip(names, results)))
    except OSError as error:
        raise QCompileError(f"{outputs}: cannot write ({error.strerror or error})") from None
    click.echo(f"wrote {', '.join(names)} to {outputs}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), required=True, help="Sample data: an .npz file or a folder of them.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Report directory to write.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--sensitivity", is_flag=True,
              help="Also rank every W8A8 node group: output SQNR with only it quantized / only it float, and the "
                   "run time keeping it float costs.")
def analyze(model, calib, output, force, sensitivity):
    """Outlier report for MODEL: per-tensor max |x|, kurtosis and share beyond 6 std."""
    from .analyze import analyze as analyze_model, analyze_sensitivity, write_report
    from .artifact import check_output

    check_output(output, force, inputs=(model, calib))
    analysis = analyze_model(model, calib)
    groups = analyze_sensitivity(model, calib) if sensitivity else None
    write_report(analysis, output, force=force, inputs=(model, calib), groups=groups)
    if groups is not None:
        click.echo(f"{len(groups)} node groups; most sensitive (output SQNR with only it float / only it quantized):")
        for group in groups[:5]:
            click.echo(f"  {group['node'][:32]:<32} {group['op_type']:<10} {group['float_alone_db']:>8} dB "
                       f"{group['quantized_alone_db']:>8} dB  float costs {group['cost_us']:g} us")
    click.echo(f"wrote {output}/report.html; largest max |x| / std:")
    worst = sorted(analysis.tensors, key=lambda t: -(t.max_abs / t.std if t.std else 0.0))[:5]
    click.echo(f"  {'tensor':<32} {'op':<20} {'max |x|':>9} {'std':>9} {'kurtosis':>9}")
    for t in worst:
        click.echo(f"  {t.tensor[:32]:<32} {t.op_type:<20} {t.max_abs:>9.3g} {t.std:>9.3g} {t.kurtosis:>9.3g}")


@cli.command()
@click.argument("name")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="The .onnx file to write.")
@click.option("--calib-out", type=click.Path(path_type=Path), help="Also write calibration samples (.npz).")
@click.option("--eval-out", type=click.Path(path_type=Path), help="Also write held-out evaluation samples (.npz).")
@click.option("--calib-samples", type=int, default=256, show_default=True)
@click.option("--eval-samples", type=int, default=128, show_default=True)
def export(name, output, calib_out, eval_out, calib_samples, eval_samples):
    """Export zoo model NAME from PyTorch to ONNX (`qcompile export list` names them)."""
    from qcompile import models

    if name == "list":
        for entry in models.ZOO.values():
            click.echo(f"{entry.name:<24} {entry.description}")
        return
    if output is None:
        raise QCompileError("give the .onnx file to write with -o")
    models.get(name)
    models.export(name, output)
    click.echo(f"exported {name} to {output}")
    for path, split, count, what in ((calib_out, "calib", calib_samples, "calibration"),
                                     (eval_out, "eval", eval_samples, "evaluation")):
        if path:
            archive = np.load(models.write_samples(name, split, count, path))
            written = len(archive[archive.files[0]])
            fewer = f" (asked for {count}; the model's data holds {written})" if written < count else ""
            click.echo(f"wrote {written} {what} samples to {path}{fewer}")


def _print_summary(manifest: dict, output: Path) -> None:
    opset = manifest["intake"]["opset"]
    if opset["from"] != opset["to"]:
        check = opset["check"]
        checked = (f"outputs match within {check['max_abs_diff']:.2g} on {check['samples']} samples"
                   if check.get("samples") else check["note"])
        click.echo(f"converted the model from opset {opset['from']} to {opset['to']} ({checked})")
    plan = manifest["plan"]
    counts = {kind: sum(t["kind"] == kind for t in plan["tensors"]) for kind in ("weight", "activation")}
    counts["weight"] += len((manifest["lut_weights"] or {}).get("layers", []))
    click.echo(f"wrote {output}: {counts['weight']} weights and {counts['activation']} activations quantized, "
               f"{len(plan['kept_float'])} nodes kept in float")
    lut_weights = manifest["lut_weights"]
    if lut_weights:
        used = sorted({layer["quantizer"] for layer in lut_weights["layers"]})
        sqnr = "" if lut_weights["sqnr_db"] is None else f"; output SQNR on calibration data {lut_weights['sqnr_db']:.2f} dB"
        width = "mixed-width" if lut_weights["bits"] is None else f"{lut_weights['bits']}-bit"
        click.echo(f"  {len(lut_weights['layers'])} weights as packed {width} lookup tables "
                   f"({', '.join(used)}), fitted to {lut_weights['fit']}{sqnr}")
        if "mixed" in lut_weights:
            mixed = lut_weights["mixed"]
            click.echo(f"  --weights auto: {mixed['bytes_fraction']:.4f} of the float weight bytes, "
                       f"{mixed['kept_float']} weights kept float")
    search = manifest["float_search"]
    if search and search["floated"]:
        click.echo(f"kept {len(search['floated'])} node groups float to reach --target-sqnr {search['target_db']:g} "
                   f"(output SQNR on calibration data {search['full_db']:.1f} dB with all integer, {search['sqnr_db']:.1f} "
                   "dB now); report.html ranks every group:")
        ranked = {group["node"]: group for group in manifest["sensitivity"]}
        for node in list(search["floated"])[:SHOWN_UNFUSED]:
            group = ranked[node]
            click.echo(f"  float: {node} ({group['op_type']}): {group['float_alone_db']} dB with only it float; "
                       f"costs {group['cost_us']:g} us per run")
        if len(search["floated"]) > SHOWN_UNFUSED:
            click.echo(f"  ... and {len(search['floated']) - SHOWN_UNFUSED} more")
    coverage = manifest["coverage"]
    if coverage["kept_float"]:
        share = coverage["kept_float"] / coverage["linear_ops"]
        lead = "warning: " if share > FLOAT_SHARE_WARNING else ""
        click.echo(f"{lead}{coverage['kept_float']} of {coverage['linear_ops']} MatMul/Gemm/Conv nodes stay float:")
        for reason, count in coverage["reasons"].items():
            click.echo(f"  {count:>4}  {reason}")
    deployed = manifest["deployed"]
    if manifest["config"]["acts"] != "none" and deployed["by_op"]:
        unfused = deployed["float"]
        click.echo(f"ONNX Runtime runs {deployed['summary']}" + (":" if unfused else ""))
        for node, kernel in list(unfused.items())[:SHOWN_UNFUSED]:
            click.echo(f"  float: {node} ({kernel})")
        if len(unfused) > SHOWN_UNFUSED:
            click.echo(f"  ... and {len(unfused) - SHOWN_UNFUSED} more (report.html lists them)")
    verification = manifest["verification"]
    if verification:
        click.echo(f"verification on {verification['samples']} held-out samples:")
        click.echo(f"  {'output':<24} {'SQNR (dB)':>10} {'mean cosine':>12}")
        for name, values in verification["outputs"].items():
            click.echo(f"  {name:<24} {values['sqnr_db']:>10} {values['cosine']:>12}")
    for message in manifest["warnings"]:
        click.echo(f"WARNING: {message}", err=True)


def main() -> None:
    settings = {"debug": False}
    try:
        cli.main(standalone_mode=False, obj=settings)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except BelowFloorError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(4)
    except QCompileError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except Exception as error:  # a bug of ours: one line, the traceback only when asked for
        if settings["debug"]:
            traceback.print_exc()
        where = str(error) if isinstance(error, InternalError) else f"{type(error).__name__}: {first_line(error)}"
        click.echo(f"internal error: {where} "
                   "(a bug in qcompile; rerun with --debug for the traceback)", err=True)
        sys.exit(3)
