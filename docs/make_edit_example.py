"""Makes docs/editing_example.png: inpainting, class-conditional editing and outpainting of Fashion-MNIST test
images with a trained class-conditional model (default: the shipped Hi-MAR quickstart).

  python docs/make_edit_example.py [--config=configs/quickstart.py] [--checkpoint=DIR] [--out=docs/editing_example.png]
      [--set=model.num_sampling_steps=1000 ...]

Each row: the input with the generated region greyed, then `--num` edits (keys 0..num-1 of --seed). Rows:
  inpainting   the centre box regenerated as the image's own class
  class edit   the same box regenerated as a related class (class-conditional editing: pullover -> coat, ...)
  outpainting  only the box kept, everything else generated as the image's own class
Every row is what `python -m himar_jax edit` writes as edit_strip.png for the same image, mask, label and seed.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fashion-MNIST class -> the class of the class-conditional edit row
RELATED = {0: 6, 1: 3, 2: 4, 3: 1, 4: 2, 5: 7, 6: 0, 7: 5, 8: 8, 9: 7}
sys.path.insert(0, REPO)


def fashion_mnist_image(index: int, side: int, path: str):
  """Test image `index` (uint8 28x28, centred on a side x side black canvas) and its label."""
  from himar_jax.data import fashion_mnist
  images, labels = fashion_mnist.load(path, "test")
  image = images[index]
  pad = side - image.shape[0]
  if pad < 0:
    raise ValueError(f"the model makes {side}x{side} images, smaller than Fashion-MNIST's 28x28.")
  return np.pad(image, ((pad // 2, pad - pad // 2),) * 2), int(labels[index])


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/quickstart.py")
  parser.add_argument("--checkpoint", default=None, help="default: the config's shipped quickstart export")
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "editing_example.png"))
  parser.add_argument("--indices", default="0,1", help="Fashion-MNIST test images (one inpainting row each)")
  parser.add_argument("--box", default="8,8,24,24", help="x0,y0,x1,y1 of the region (32 px images)")
  parser.add_argument("--num", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data", default=None, help="Fashion-MNIST IDX folder (default: the config's data.path)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override, e.g. --set=model.num_sampling_steps=1000 (as --config.FIELD=VALUE)")
  args = parser.parse_args(argv)

  from himar_jax import editing, sampling
  from himar_jax.data.fashion_mnist import CLASS_NAMES
  from himar_jax.evaluation.images import save_grid

  config = sampling.load_config_spec(args.config)
  for item in args.set:
    field, _, value = item.partition("=")
    node = config
    parts = field.split(".")
    for part in parts[:-1]:
      node = node[part]
    node[parts[-1]] = type(node[parts[-1]])(value)
  checkpoint = args.checkpoint or os.path.join(config.quickstart.checkpoint, "checkpoints")
  side, channels = editing.image_spec(config)
  restored = sampling.restore_model_for_sampling(config, checkpoint)
  tokenizer = None if config.model.family == "pixel_mar" else sampling.load_tokenizer(config)[:2]
  box = editing.box_mask(args.box, side)
  rows, captions = [], []
  for index in (int(i) for i in args.indices.split(",")):
    image, label = fashion_mnist_image(index, side, args.data or config.data.path)
    pixels = (image.astype(np.float32) / 127.5 - 1.0)[..., None]
    if channels != 1:
      pixels = np.repeat(pixels, channels, axis=-1)
    other = RELATED[label]  # a garment of a similar outline: a tiny model cannot turn a boot into a coat
    for generate, row_label, caption in ((box, label, f"inpaint: {CLASS_NAMES[label]}"),
                                         (box, other, f"as {CLASS_NAMES[other]}"),
                                         (~box, label, f"outpaint: {CLASS_NAMES[label]}")):
      result = editing.edit(config, restored, pixels, generate, label=row_label, num=args.num, seed=args.seed,
                            tokenizer=tokenizer)
      rows.append(editing.edit_strip(pixels, generate, result["images"])[0])
      captions.append(caption)
  path = save_grid(np.stack(rows), args.out, row_labels=captions, scale=2, label_width=130)
  print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")
  return path


if __name__ == "__main__":
  main()
