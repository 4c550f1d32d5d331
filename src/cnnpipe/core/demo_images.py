"""`cnnpipe example-images DIR`: a tiny generated image set (coloured shapes) to try the own-images path."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle")


def shape_image(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size×size×3 uint8 image of one shape on a noisy background."""
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = rng.uniform(0.4, 0.6, 2)
    r = rng.uniform(0.25, 0.35)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    elif kind == "square":
        mask = (abs(yy - cy) < r * 0.8) & (abs(xx - cx) < r * 0.8)
    else:
        mask = (yy > cy - r) & (yy < cy + r) & (abs(xx - cx) < (yy - (cy - r)) / 2)
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    img[mask] = rng.integers(150, 255, 3)
    return img


def make_example_images(root: str | Path, per_class: int = 12, size: int = 24, kind: str = "imagefolder",
                        seed: int = 0) -> Path:
    """Write root/<class>/NNN.png (imagefolder) or root/images/*.jpg + root/labels.csv (csv)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for label in SHAPES:
        for i in range(per_class):
            img = Image.fromarray(shape_image(label, size, rng))
            if kind == "imagefolder":
                (root / label).mkdir(parents=True, exist_ok=True)
                img.save(root / label / f"{i:03d}.png")
            else:
                (root / "images").mkdir(parents=True, exist_ok=True)
                img.save(root / "images" / f"{label}_{i:03d}.jpg", quality=95)
                rows.append((f"images/{label}_{i:03d}.jpg", label))
    if kind == "csv":
        with open(root / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *rows])
        return root / "labels.csv"
    return root
