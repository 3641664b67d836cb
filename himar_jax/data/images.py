"""Image sources shared by training, the latent cache and evaluation: ADM's center crop, ImageFolder-layout
folders and in-memory uint8 arrays. Each source returns (uint8 (size, size, C) image, int label)."""
from __future__ import annotations

import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


def center_crop_adm(image, image_size: int) -> np.ndarray:
  """ADM's center crop: halve with BOX filtering while the short side is >= 2x the target, BICUBIC-resize the
  short side to image_size, crop the center. PIL image -> uint8 (image_size, image_size, C)."""
  from PIL import Image

  while min(image.size) >= 2 * image_size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
  scale = image_size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


class ImageFolderSource:
  """ImageFolder layout (root/<class>/<image>): classes sorted by name; ADM center crop to image_size."""

  def __init__(self, root: str, image_size: int):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"image folder {root!r} does not exist; point the config's path (data.path for "
                              "training, cache.path for cache-latents) at a directory of class sub-folders "
                              "(e.g. imagenet/train).")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.files, self.labels = [], []
    for label, name in enumerate(classes):
      for fname in sorted(os.listdir(os.path.join(root, name))):
        if fname.endswith(IMAGE_EXTENSIONS):
          self.files.append(os.path.join(root, name, fname))
          self.labels.append(label)
    if not self.files:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS[:5])}) under class folders of {root!r}.")
    self.image_size = image_size

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    from PIL import Image
    with Image.open(self.files[i]) as im:
      image = center_crop_adm(im.convert("RGB"), self.image_size)
    return image, self.labels[i]


class ArrayImageSource:
  """In-memory uint8 images (N, h, w[, C]) and labels; images smaller than image_size are centred on a black
  (background) canvas, as the Fashion-MNIST pipeline does; larger ones are center-cropped."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int):
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
      raise ValueError(f"ArrayImageSource needs uint8 images (N, h, w[, C]); got {images.dtype} {images.shape}.")
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    self.images, self.labels, self.image_size = images, np.asarray(labels, np.int32), image_size

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    image = self.images[i]
    if image.ndim == 2:
      image = image[..., None]
    h, w = image.shape[:2]
    s = self.image_size
    if h >= s and w >= s:
      top, left = (h - s) // 2, (w - s) // 2
      return image[top:top + s, left:left + s], int(self.labels[i])
    canvas = np.zeros((s, s, image.shape[-1]), np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    canvas[top:top + h, left:left + w] = image
    return canvas, int(self.labels[i])
