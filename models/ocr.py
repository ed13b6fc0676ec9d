"""PaddleOCR's PP-OCRv4 text detector and text recogniser, as third-party ONNX files (opset 12,
PaddlePaddle's exporter) shipped in the `rapidocr-onnxruntime` wheel, and text images to run them
on: lines of real news sentences (the Lee corpus) rendered in matplotlib's DejaVu Sans onto crops of
the bundled photos (calibration photos for calibration, the others for evaluation)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .text import CALIBRATION_FILE, EVALUATION_FILE, sentences
from .vision import PHOTOS, _photo

MODEL_FILES = {"ppocrv4-det": "ch_PP-OCRv4_det_infer.onnx", "ppocrv4-rec": "ch_PP-OCRv4_rec_infer.onnx"}
DETECTOR_SIDE = 256  # detector inputs: 256 x 256 pages with a few text lines
LINE_HEIGHT, LINE_WIDTH = 48, 320  # recogniser inputs: one line, the height PP-OCRv4 expects
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def model_path(name: str) -> Path:
    """The ONNX file inside the installed wheel (found without importing it: it imports OpenCV)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        raise FileNotFoundError("rapidocr-onnxruntime is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0]) / "models" / MODEL_FILES[name]


def _font(size: int):
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf/DejaVuSans.ttf"), size)


def _background(split: str, index: int, height: int, width: int, rng) -> np.ndarray:
    """A lightened crop of a photo (text is dark on a light, textured page), values in [0, 1]."""
    names = PHOTOS[: len(PHOTOS) // 2] if split == "calib" else PHOTOS[len(PHOTOS) // 2:]
    pixels = _photo(names[index % len(names)])
    if pixels.shape[1] < width:
        pixels = np.concatenate([pixels, pixels[:, ::-1]], axis=1)
    top = rng.integers(0, pixels.shape[0] - height + 1)
    left = rng.integers(0, pixels.shape[1] - width + 1)
    return 0.55 + 0.45 * pixels[top:top + height, left:left + width]


def _render(background: np.ndarray, lines: list[tuple[str, int, int, int]]) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.fromarray((background * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for text, x, y, size in lines:
        draw.text((x, y), text, fill=(20, 20, 30), font=_font(size))
    return np.asarray(image, dtype=np.float32) / 255.0


def text_samples(name: str, split: str, count: int) -> dict[str, np.ndarray]:
    """`count` images for the detector (pages of 3-5 lines) or the recogniser (single lines), NCHW,
    normalised as PaddleOCR does."""
    rng = np.random.default_rng(0 if split == "calib" else 1)
    words = " ".join(sentences(CALIBRATION_FILE if split == "calib" else EVALUATION_FILE, 4 * count)).split()
    images = []
    for index in range(count):
        start = rng.integers(0, len(words) - 12)
        if name == "ppocrv4-rec":
            text = " ".join(words[start:start + 4])
            page = _render(_background(split, index, LINE_HEIGHT, LINE_WIDTH, rng), [(text, 4, 8, 26)])
            images.append(((page - 0.5) / 0.5).transpose(2, 0, 1))
        else:
            lines = [(" ".join(words[start + 3 * k:start + 3 * k + 3]), int(rng.integers(2, 40)), 10 + 48 * k,
                      int(rng.integers(18, 30))) for k in range(int(rng.integers(3, 6)))]
            page = _render(_background(split, index, DETECTOR_SIDE, DETECTOR_SIDE, rng), lines)
            images.append(((page - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return {"x": np.stack(images).astype(np.float32)}
