"""torchvision architectures (random weights) exported the ways other people export them, as corpus
cases for benchmarks/corpus.py: the legacy TorchScript exporter at opsets 11 and 13 and the dynamo
exporter at opsets 17 and 18.

    .venv/bin/python benchmarks/corpus_torchvision.py [ARCH ...]   # export into build/bench/corpus/torchvision/

Each export is a case folder NAME_EXPORTEROPSET/ (resnet18_legacy11, ...) with model.onnx (plus
the dynamo exporter's external-data file, as it writes it), test_data_set_{0..3}/input_0.pb (random
normal images) and output_0.pb (PyTorch's outputs), and export.json (the exporter's status: a
failed export is a skipped case, not a qcompile failure). Exports are cached.

torchvision on PyPI for Linux is the CUDA build: its C extension (torchvision/_C.so) needs
libc10_cuda.so and does not load next to the CPU build of torch, and torchvision/__init__.py then
fails registering fake kernels for the extension's ops. The model definitions are pure Python, so
`import_models()` imports torchvision.models under a bare `torchvision` package whose __init__.py
is not run. `make setup` installs it without dependencies into .venv/torchvision, off sys.path
(importable, it would break transformers' imports):

    .venv/bin/pip install --no-deps --target .venv/torchvision torchvision==0.28.0
"""
from __future__ import annotations

import importlib.machinery
import json
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

EXPORTS = (("legacy", 11), ("legacy", 13), ("dynamo", 17), ("dynamo", 18))
DEFAULT_ARCHS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5",
                 "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "vit_tiny")
# others: 64 x 64 (all-convolutional with pooling)
IMAGE_SIZE = {"vit_b_16": 224, "swin_t": 224, "vit_tiny": 64, "vit_s16": 224}
SAMPLES = 4
RECIPE = 2  # bump when build() or the data change: cached exports of another recipe are redone
EXPORT_TIMEOUT = 900.0
TORCHVISION_DIR = Path(sys.prefix) / "torchvision"


def torchvision_spec():
    """torchvision as `make setup` installs it: in .venv/torchvision, off sys.path, because an importable
    torchvision whose C extension cannot load breaks transformers' imports (and with them the zoo)."""
    return importlib.machinery.PathFinder.find_spec("torchvision", [str(TORCHVISION_DIR)])


def import_models():
    """torchvision.models, imported without running torchvision/__init__.py (see the module docstring)."""
    spec = torchvision_spec()
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"torchvision is not installed in {TORCHVISION_DIR} (make setup installs it)")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    package.__spec__ = spec
    package._is_tracing = lambda: False  # what torchvision/__init__.py would define and the models use
    sys.modules["torchvision"] = package
    import torchvision.models as models

    return models


def build(arch: str):
    import torch

    models = import_models()
    torch.manual_seed(0)
    if arch == "vit_tiny":  # torchvision's ViT at ViT-Ti/8 width and 4 layers: vit_b_16 is 86 M parameters
        from torchvision.models.vision_transformer import VisionTransformer

        net = VisionTransformer(image_size=64, patch_size=8, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768)
    elif arch == "vit_s16":  # ViT-S/16's shape (22 M parameters), for w8a8_vision.py; too slow for DEFAULT_ARCHS
        from torchvision.models.vision_transformer import VisionTransformer

        net = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)
    else:
        net = getattr(models, arch)(weights=None)
    return _healthy(net, IMAGE_SIZE.get(arch, 64))


def _healthy(net, size: int):
    """Random weights that give input-dependent outputs of order one, so that the output SQNR means
    something: zero-initialised layers (ViT's head) get small random weights, and every BatchNorm's
    running statistics are measured on random images (with torchvision's default initialisation,
    MobileNetV2's logits are ~1e-9 and ShuffleNet's barely depend on the input)."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.any():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # cumulative average over the batches below
            net.train()
            for _ in range(4):
                net(torch.randn(8, 3, size, size, generator=generator))
    return net.eval()


def export_arch(arch: str, root: Path) -> None:
    """All EXPORTS of one architecture (run in its own process by export_all)."""
    import numpy as np
    import torch
    import onnx
    from onnx import numpy_helper

    net = build(arch)
    size = IMAGE_SIZE.get(arch, 64)
    generator = torch.Generator().manual_seed(1)
    samples = [torch.randn(1, 3, size, size, generator=generator) for _ in range(SAMPLES)]
    with torch.no_grad():
        outputs = [net(x) for x in samples]
    for exporter, opset in EXPORTS:
        folder = root / f"{arch}_{exporter}{opset}"
        status_path = folder / "export.json"
        if status_path.is_file() and json.loads(status_path.read_text()).get("recipe") == RECIPE:
            continue
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        status = {"arch": arch, "exporter": exporter, "opset": opset, "torch": torch.__version__, "recipe": RECIPE}
        try:
            path = folder / "model.onnx"
            if exporter == "legacy":
                torch.onnx.export(net, (samples[0],), str(path), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"])
            else:
                torch.onnx.export(net, (samples[0],), str(path), dynamo=True, opset_version=opset)
            model = onnx.load(str(path), load_external_data=False)
            initializers = {init.name for init in model.graph.initializer}
            input_name = next(v.name for v in model.graph.input if v.name not in initializers)
            for index, (x, y) in enumerate(zip(samples, outputs)):
                data = folder / f"test_data_set_{index}"
                data.mkdir(exist_ok=True)
                (data / "input_0.pb").write_bytes(numpy_helper.from_array(x.numpy(), input_name).SerializeToString())
                (data / "output_0.pb").write_bytes(
                    numpy_helper.from_array(np.asarray(y.numpy()), model.graph.output[0].name).SerializeToString())
            status.update(ok=True, opset_written=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
                          files=sorted(p.name for p in folder.iterdir() if p.is_file()))
        except Exception as error:  # an exporter failure is the exporter's, not a qcompile case
            text = str(error).strip()
            status.update(ok=False, error=f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}")
            (folder / "model.onnx").unlink(missing_ok=True)
        status["seconds"] = round(time.monotonic() - started, 1)
        status_path.write_text(json.dumps(status, indent=1) + "\n")


def _current(status: Path) -> bool:
    return status.is_file() and json.loads(status.read_text()).get("recipe") == RECIPE


def export_all(root: Path, archs=None, progress=print) -> list[dict]:
    """Export every architecture not exported yet, each in a child process (PyTorch stays out of the
    corpus runner, which forks). Returns every export's status."""
    archs = list(archs or DEFAULT_ARCHS)
    root.mkdir(parents=True, exist_ok=True)
    if torchvision_spec() is None:
        if progress:
            progress(f"torchvision is not installed in {TORCHVISION_DIR}: no exports (make setup installs it)")
        return []
    for arch in archs:
        if all(_current(root / f"{arch}_{e}{o}" / "export.json") for e, o in EXPORTS):
            continue
        if progress:
            progress(f"exporting {arch} (legacy 11/13, dynamo 17/18) ...")
        started = time.monotonic()
        try:
            done = subprocess.run([sys.executable, __file__, "--root", str(root), arch], capture_output=True, text=True,
                                  timeout=EXPORT_TIMEOUT)
            failure = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            failure = f"export timed out after {EXPORT_TIMEOUT:.0f} s"
        if failure:
            for exporter, opset in EXPORTS:
                status = root / f"{arch}_{exporter}{opset}" / "export.json"
                if not _current(status):
                    status.parent.mkdir(parents=True, exist_ok=True)
                    (status.parent / "model.onnx").unlink(missing_ok=True)
                    status.write_text(json.dumps({"arch": arch, "exporter": exporter, "opset": opset, "ok": False,
                                                  "recipe": RECIPE, "error": failure}) + "\n")
        if progress:
            progress(f"  {arch}: {time.monotonic() - started:.0f} s" + (f" ({failure})" if failure else ""))
    statuses = []
    for arch in archs:
        for exporter, opset in EXPORTS:
            status = root / f"{arch}_{exporter}{opset}" / "export.json"
            if status.is_file():
                statuses.append(json.loads(status.read_text()))
    return statuses


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Export torchvision architectures for the corpus.")
    parser.add_argument("archs", nargs="*")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1] / "build/bench/corpus/torchvision")
    args = parser.parse_args()
    if len(args.archs) == 1 and args.root:
        export_arch(args.archs[0], args.root)
    else:
        for status in export_all(args.root, args.archs or None):
            print(f"{status['arch']:<20} {status['exporter']:<7} {status['opset']:>3} "
                  f"{'ok' if status.get('ok') else status.get('error')}")
