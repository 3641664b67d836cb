"""Official MAR / Hi-MAR checkpoint import: every official key and shape, safe loading, orbax round trip."""
import argparse
import json
import os
import sys

import numpy as np
import pytest

from configs.himar import get_config
from himar_jax import sampling
from himar_jax.convert import himar as convert
from himar_jax.models.heads import sincos_pos_embed_2d

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "himar")
with open(os.path.join(FIXTURES, "state_dict_keys.json")) as fh:
  OFFICIAL = json.load(fh)
# Parameters the official classes register but the forward never trains or uses (the DiT head's fixed sin-cos
# table and its unused c_pos_embed).
UNUSED = {"himar_b": 2 * 256 * 512, "himar_l": 2 * 256 * 512, "himar_h": 2 * 256 * 768}


def synthetic_state_dict(variant):
  """Zero-memory arrays with every official key and shape; the DiT pos_embed holds its fixed table."""
  sd = {}
  for key, shape in OFFICIAL[variant]["keys"].items():
    if key == "cond_diffloss.net.pos_embed":
      sd[key] = sincos_pos_embed_2d(shape[-1], 16)[None]
    else:
      sd[key] = np.broadcast_to(np.float32(0.0), tuple(shape))
  return sd


@pytest.mark.parametrize("variant", sorted(OFFICIAL))
def test_every_official_key_converts_with_nothing_left_over(variant):
  sd = synthetic_state_dict(variant)
  flat, dropped, unexpected = convert.convert_state_dict(variant.split("_")[0], sd)
  assert unexpected == []
  expected_dropped = ["cond_diffloss.net.c_pos_embed", "cond_diffloss.net.pos_embed"] if "himar" in variant else []
  assert sorted(dropped) == expected_dropped
  converted = sum(int(np.prod(v.shape)) for v in flat.values())
  assert converted == OFFICIAL[variant]["params"] - UNUSED.get(variant, 0)
  if variant.endswith("_b"):  # the model the config builds takes exactly these (L / H: see `info`, slower)
    abstract = convert.abstract_param_shapes(get_config(variant))
    convert.check_against(flat, abstract)  # raises on any missing / unexpected / shape mismatch


def test_mismatches_are_named():
  config = get_config("mar_b")
  sd = synthetic_state_dict("mar_b")
  del sd["encoder_blocks.3.mlp.fc1.weight"]
  sd["encoder_blocks.0.extra.weight"] = np.zeros((2, 2), np.float32)
  sd["decoder_embed.weight"] = np.zeros((768, 700), np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as err:
    convert.convert_for_config(config, sd)
  msg = str(err.value)
  assert "missing: encoder_blocks.3.mlp.fc1.kernel" in msg
  assert "unexpected key: encoder_blocks.0.extra.weight" in msg
  assert "shape: decoder_embed.kernel is (768, 768) in the model, (700, 768)" in msg
  # A Hi-MAR checkpoint does not load into MAR (and vice versa): the extra keys are named.
  with pytest.raises(convert.CheckpointMismatchError, match=r"holds a himar \(768 x 12\) model but "
                     r"config.model.family='mar'"):
    convert.convert_for_config(config, synthetic_state_dict("himar_b"))
  with pytest.raises(convert.CheckpointMismatchError, match=r"holds a himar \(768 x 12\) model but the config "
                     r"builds 1024 x 16"):
    convert.convert_for_config(get_config("himar_l"), synthetic_state_dict("himar_b"))


def _tiny_official():
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_himar import _fixture, _official_config
  fx = _fixture("himar_losses.npz")
  return _official_config(fx), {k[3:]: v for k, v in fx.items() if k.startswith("sd/")}


def test_checkpoint_file_to_orbax_restores_for_sampling(tmp_path):
  torch = pytest.importorskip("torch")
  config, sd = _tiny_official()
  ema = {k: v if k.endswith("pos_embed") and "diffloss" in k else v + 1.0 for k, v in sd.items()}
  ckpt = tmp_path / "checkpoint-last.pth"
  # The official files also pickle the training args (argparse.Namespace) and the optimizer state.
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()},
              "model_ema": {k: torch.from_numpy(v) for k, v in ema.items()},
              "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 799,
              "args": argparse.Namespace(model="himar_base", cfg=2.5)}, str(ckpt))
  out = tmp_path / "converted"
  # Through the `convert` verb (himar_jax/convert/__init__.py dispatches MAR / Hi-MAR configs to convert/himar).
  from types import SimpleNamespace

  from himar_jax.convert import convert_verb
  config.convert.src = str(ckpt)
  assert convert_verb(SimpleNamespace(config=config, workdir=str(out))) == 0
  with pytest.raises(FileExistsError, match="pick an empty --workdir"):
    convert_verb(SimpleNamespace(config=config, workdir=str(out)))
  restored = sampling.restore_model_for_sampling(config, str(out))
  got = np.asarray(restored.params["encoder_blocks"][1]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(got, ema["encoder_blocks.1.attn.qkv.weight"].T)
  np.testing.assert_array_equal(np.asarray(restored.params["cond_tokens"]), ema["cond_tokens"])
  np.testing.assert_array_equal(np.asarray(restored.params["dit_head"]["c_embedder"]["kernel"]),
                                ema["cond_diffloss.net.c_embedder.proj.weight"][:, :, 0, 0].T)


def test_unreadable_and_missing_checkpoints_are_named(tmp_path):
  torch = pytest.importorskip("torch")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert.read_checkpoint(str(tmp_path / "nope.pth"))
  bad = tmp_path / "bad.pth"
  torch.save({"model": {}, "hook": convert.CheckpointMismatchError("x")}, str(bad))
  with pytest.raises(ValueError, match="weights_only=True"):
    convert.read_checkpoint(str(bad))
  plain = tmp_path / "plain.pth"
  torch.save({"weights": {}}, str(plain))
  with pytest.raises(ValueError, match="no 'model' entry"):
    convert.read_checkpoint(str(plain))
