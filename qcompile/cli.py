"""The `qcompile` command line: compile, run, export."""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from .config import ACTIVATION_FORMATS, CALIBRATION_METHODS, WEIGHT_FORMATS, QuantConfig
from .errors import QCompileError


@click.group()
@click.version_option(package_name="qcompile")
def cli() -> None:
    """Ahead-of-time quantization compiler for ONNX models."""


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration data: an .npz file or a folder of them.")
@click.option("--verify-data", type=click.Path(path_type=Path),
              help="Held-out samples for verification (default: hold out part of --calib).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Artifact directory to write.")
@click.option("--weights", type=click.Choice(WEIGHT_FORMATS), default="int8", show_default=True)
@click.option("--acts", type=click.Choice(ACTIVATION_FORMATS), default="int8", show_default=True)
@click.option("--calib-method", type=click.Choice(CALIBRATION_METHODS), default="mse", show_default=True)
@click.option("--percentile", type=float, default=99.99, show_default=True, help="For --calib-method percentile.")
@click.option("--no-attention", is_flag=True, help="Keep attention's activation x activation MatMuls in float.")
@click.option("--no-residual", is_flag=True, help="Keep residual Adds in float.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--explain", is_flag=True, help="Print what each pass found, or why a pattern did not match.")
def compile(model, calib, verify_data, output, weights, acts, calib_method, percentile, no_attention, no_residual, force,
            explain):
    """Quantize MODEL (an .onnx file) and write an artifact directory."""
    from .compiler import compile as compile_model

    if output.exists() and not force:  # fail before the slow part
        raise QCompileError(f"{output}: output directory exists (use --force to replace it)")
    config = QuantConfig(weights=weights, acts=acts, calib_method=calib_method, percentile=percentile,
                         quantize_attention=not no_attention, quantize_residual_adds=not no_residual)
    artifact = compile_model(model, config, calib=calib, verify_data=verify_data)
    artifact.save(output, force=force)
    if explain:
        for note in artifact.manifest["explain"]:
            click.echo(f"{note['pass']}: {note['node']}: {note['note']}")
    _print_summary(artifact.manifest, output)


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
    session = loaded.session()
    names = [output.name for output in session.get_outputs()]
    np.savez(outputs, **dict(zip(names, session.run(names, feed))))
    click.echo(f"wrote {', '.join(names)} to {outputs}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path), required=True, help="Sample data: an .npz file or a folder of them.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Report directory to write.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
def analyze(model, calib, output, force):
    """Outlier report for MODEL: per-tensor max |x|, kurtosis and share beyond 6 std."""
    from .analyze import analyze as analyze_model, write_report

    if output.exists() and not force:
        raise QCompileError(f"{output}: output directory exists (use --force to replace it)")
    analysis = analyze_model(model, calib)
    write_report(analysis, output, force=force)
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
    if calib_out:
        models.write_samples(name, "calib", calib_samples, calib_out)
        click.echo(f"wrote {calib_samples} calibration samples to {calib_out}")
    if eval_out:
        models.write_samples(name, "eval", eval_samples, eval_out)
        click.echo(f"wrote {eval_samples} evaluation samples to {eval_out}")


def _print_summary(manifest: dict, output: Path) -> None:
    plan = manifest["plan"]
    counts = {kind: sum(t["kind"] == kind for t in plan["tensors"]) for kind in ("weight", "activation")}
    click.echo(f"wrote {output}: {counts['weight']} weights and {counts['activation']} activations quantized, "
               f"{len(plan['kept_float'])} nodes kept in float")
    verification = manifest["verification"]
    if verification:
        click.echo(f"verification on {verification['samples']} held-out samples:")
        click.echo(f"  {'output':<24} {'SQNR (dB)':>10} {'mean cosine':>12}")
        for name, values in verification["outputs"].items():
            click.echo(f"  {name:<24} {values['sqnr_db']:>10} {values['cosine']:>12}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except QCompileError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
