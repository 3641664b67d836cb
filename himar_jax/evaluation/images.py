"""Image output: float images in [-1, 1] -> uint8, PNG files, and a labelled grid (one row per class)."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images) -> np.ndarray:
  """(..., H, W, C) floats in [-1, 1] -> uint8 [0, 255] (round half to even, clipped)."""
  images = np.asarray(images, np.float32)
  return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images, path: str, *, row_labels: Sequence[str] | None = None, scale: int = 2,
              label_width: int = 110, pad: int = 2) -> str:
  """Saves uint8 or [-1, 1] images (rows, cols, H, W, C) as one PNG; each row is captioned by `row_labels` (which
  may hold several lines)."""
  images = np.asarray(images)
  if images.ndim != 5:
    raise ValueError(f"save_grid expects (rows, cols, H, W, C) images, got shape {images.shape}.")
  if images.dtype != np.uint8:
    images = to_uint8(images)
  rows, cols, h, w, c = images.shape
  if c not in (1, 3):
    raise ValueError(f"save_grid needs 1 or 3 channels, got {c}.")
  if row_labels is not None and len(row_labels) != rows:
    raise ValueError(f"{len(row_labels)} row labels for {rows} rows.")
  h, w = h * scale, w * scale
  left = label_width if row_labels is not None else 0
  canvas = Image.new("RGB", (left + cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  for r in range(rows):
    y = pad + r * (h + pad)
    if row_labels is not None:
      label = str(row_labels[r])
      lines = label.count("\n") + 1  # multi-line labels (captions) are centred on the row as a block
      draw.text((4, y + max(0, h // 2 - 7 * lines)), label, fill=(0, 0, 0), font=font)
    for col in range(cols):
      tile = images[r, col]
      tile = np.repeat(tile, 3, axis=-1) if c == 1 else tile
      tile = Image.fromarray(tile).resize((w, h), Image.NEAREST)
      canvas.paste(tile, (left + pad + col * (w + pad), y))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  canvas.save(tmp)
  os.replace(tmp, path)  # never leave a half-written file under the final name
  return path
