"""Generated stand-ins for data a smoke run cannot reach: text and image folders of the shape a
workload's model takes.

The content is deterministic and each file is written once: prepared data is cached by the
source's size and modification time, so a second smoke run reuses what the first prepared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["IMAGES_PER_CLASS", "TEXT_LINES", "image_folder", "text_corpus"]

TEXT_LINES = 2000
IMAGES_PER_CLASS = 16
_IMAGE_CLASSES = 4
_WORDS = 3000


def text_corpus(path: Path, *, jsonl: bool, text_column: str, seed: int) -> Path:
    """Lines of pseudo-words with a Zipf-like frequency, as plain text or JSON lines."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "ex", "an", "or"]
    words = [
        "".join(rng.choice(syllables, size=rng.integers(1, 4))) + str(i % 7 or "")
        for i in range(_WORDS)
    ]
    # Zipf-like: a few words are frequent, as in real text, so tokenizers learn merges.
    weights = 1.0 / np.arange(1, _WORDS + 1)
    weights /= weights.sum()
    lines = []
    for _ in range(TEXT_LINES):
        sentence = " ".join(rng.choice(words, size=rng.integers(8, 40), p=weights)) + "."
        lines.append(json.dumps({text_column: sentence}) if jsonl else sentence)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)  # never a half-written corpus that a later run would reuse
    return path


def image_folder(root: Path, *, channels: int, size: int, seed: int) -> Path:
    """A folder of class sub-folders holding PNGs whose classes differ in brightness."""
    if (root / ".complete").is_file():
        return root
    import torch
    from torchvision.io import encode_png

    rng = np.random.default_rng(seed)
    side = min(size, 64)  # decoding resizes to the model's size; small files prepare fast
    for label in range(_IMAGE_CLASSES):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(IMAGES_PER_CLASS):
            base = 40 + 50 * label
            pixels = rng.integers(base, base + 40, size=(channels, side, side), dtype=np.uint8)
            png = encode_png(torch.from_numpy(pixels)).numpy().tobytes()
            (folder / f"{i:04d}.png").write_bytes(png)
    (root / ".complete").write_text("")  # a hidden file: sources skip it
    return root
