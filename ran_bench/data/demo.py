"""The demo dataset: small JPEGs of 10 shape classes in the ImageNet folder layout.

Each class is a shape (or texture) drawn at a random position, scale, rotation and colour over
a noisy gradient background, at a random image size and aspect ratio. The class also biases the
hue (neighbouring classes overlap), so a small CNN gets well above chance within minutes on a
CPU while a colour histogram alone cannot solve it. Deterministic from the seed.
"""

from __future__ import annotations

import colorsys
import io
import math
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ran_bench.errors import InputError

CLASSES = ("circle", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "checker",
           "diagonal", "dots")


def _colour(rng: np.random.Generator, hue: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    c0, c1 = rng.uniform(0, 160, 3), rng.uniform(0, 160, 3)
    t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
    grad = c0 + (c1 - c0) * t[:, None]
    grad = grad[None, :, :].repeat(h, 0) if len(t) == w else grad[:, None, :].repeat(w, 1)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(grad + noise, 0, 255).astype(np.uint8), "RGB")


def _polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _texture(kind: str, s: int, colour, rng: np.random.Generator) -> Image.Image:
    """A square RGBA patch of side s with a striped, checked or dotted texture."""
    patch = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(patch)
    period = max(4, int(s * rng.uniform(0.15, 0.3)))
    half = max(2, period // 2)
    for k in range(-s, 2 * s, period):
        if kind == "hstripes":
            d.rectangle([0, k, s, k + half - 1], fill=colour)
        elif kind == "vstripes":
            d.rectangle([k, 0, k + half - 1, s], fill=colour)
        elif kind == "diagonal":
            d.polygon([(k, 0), (k + half, 0), (k + half - s, s), (k - s, s)], fill=colour)
        elif kind in ("checker", "dots"):
            for j in range(0, s, period):
                if kind == "checker" and (k // period + j // period) % 2 == 0:
                    d.rectangle([k, j, k + period - 1, j + period - 1], fill=colour)
                elif kind == "dots":
                    d.ellipse([k + 1, j + 1, k + half, j + half], fill=colour)
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).ellipse([0, 0, s - 1, s - 1], fill=255) if rng.random() < 0.5 else \
        ImageDraw.Draw(mask).rectangle([0, 0, s - 1, s - 1], fill=255)
    patch.putalpha(Image.composite(patch.getchannel("A"), mask, mask))
    return patch


def demo_image(label: int, rng: np.random.Generator, min_side: int, max_side: int) -> Image.Image:
    """One RGB image of class `label`."""
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    img = _background(rng, w, h)
    kind = CLASSES[label % len(CLASSES)]
    colour = _colour(rng, label / len(CLASSES) + rng.normal(0, 0.1))
    s = int(min(w, h) * rng.uniform(0.45, 0.85))
    cx, cy = rng.uniform(s / 2, w - s / 2), rng.uniform(s / 2, h - s / 2)
    d = ImageDraw.Draw(img)
    r, angle = s / 2, rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        d.polygon(_polygon(cx, cy, r, 4, angle), fill=colour)
    elif kind == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, angle), fill=colour)
    elif kind == "cross":
        bar = max(2, s // 4)
        arm = [(-r, -bar / 2), (r, -bar / 2), (r, bar / 2), (-r, bar / 2)]
        for a in (angle, angle + math.pi / 2):
            d.polygon([(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a))
                       for x, y in arm], fill=colour)
    elif kind == "ring":
        width = max(2, int(r * rng.uniform(0.25, 0.4)))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    else:
        patch = _texture(kind, s, colour, rng)
        img.paste(patch, (int(cx - r), int(cy - r)), patch)
    return img


def _write_images(out: Path, split_no: int, split: str, label: int, first: int, stop: int, *, seed: int,
                  min_side: int, max_side: int, quality: int) -> None:
    """Images `first` to `stop - 1` of class `label` in `split`, each drawn from its own seed."""
    d = out / split / CLASSES[label]
    for i in range(first, stop):
        rng = np.random.default_rng([seed, split_no, label, i])
        buf = io.BytesIO()
        demo_image(label, rng, min_side, max_side).save(buf, "JPEG", quality=quality)
        (d / f"{split}_{CLASSES[label]}_{i:05d}.JPEG").write_bytes(buf.getvalue())


def make_demo(out: str | Path, *, seed: int = 0, train_per_class: int = 100, val_per_class: int = 30,
              num_classes: int = len(CLASSES), min_side: int = 80, max_side: int = 160,
              quality: int = 80, workers: int = 1) -> dict[str, int]:
    """Write OUT/train/<class>/*.JPEG and OUT/val/<class>/*.JPEG; returns images per split.
    Refuses to write into an existing non-empty OUT. `workers` processes write the same images
    as one (ImageNet-sized sets take minutes on one core)."""
    out = Path(out)
    if not 1 <= num_classes <= len(CLASSES):
        raise InputError(f"--classes must be in 1..{len(CLASSES)}, got {num_classes}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; choose a new directory or delete it first")
    counts, jobs = {}, []
    for split_no, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label in range(num_classes):
            (out / split / CLASSES[label]).mkdir(parents=True, exist_ok=True)
            step = max(1, -(-per_class // workers))  # about `workers` jobs per class keep every process busy
            jobs += [(split_no, split, label, i, min(i + step, per_class)) for i in range(0, per_class, step)]
        counts[split] = per_class * num_classes
    write = partial(_write_images, out, seed=seed, min_side=min_side, max_side=max_side, quality=quality)
    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            write(*job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write, *zip(*jobs)))
    return counts


def write_odd_files(class_dir: str | Path, *, size: int = 40, seed: int = 0) -> dict[str, Path]:
    """Files that real ImageNet folders contain, for tests and `verify`: a grayscale JPEG, a CMYK
    JPEG, a PNG named .JPEG, a truncated JPEG and a non-image file. Returns kind -> path."""
    d = Path(class_dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = demo_image(0, rng, size, size)
    paths = {k: d / f"odd_{k}.JPEG" for k in ("grayscale", "cmyk", "png", "truncated")}
    base.convert("L").save(paths["grayscale"], "JPEG", quality=90)
    base.convert("CMYK").save(paths["cmyk"], "JPEG", quality=90)
    base.save(paths["png"], "PNG")
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=90)
    paths["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    paths["text"] = d / "notes.txt"
    paths["text"].write_text("not an image\n")
    return paths
