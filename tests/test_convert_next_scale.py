"""Official VAR / HMAR state-dict import: every official key and shape, named mismatches, safe .pth loading, and
the convert -> orbax -> sampling-restore round trip reproducing the official logits."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.next_scale import get_config
from himar_jax import sampling
from himar_jax.convert import next_scale as convert
from himar_jax.convert.himar import CheckpointMismatchError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "next_scale")
with open(os.path.join(FIXTURES, "state_dict_keys.json")) as fh:
  OFFICIAL = json.load(fh)


def synthetic_state_dict(variant):
  """Zero-memory arrays with every official key and shape."""
  return {k: np.broadcast_to(np.float32(0.0), tuple(s)) for k, s in OFFICIAL[variant]["keys"].items()}


def fixture(name):
  with np.load(os.path.join(FIXTURES, name)) as f:
    return {k: f[k] for k in f.files}


def save_pth(path, arrays):
  torch = pytest.importorskip("torch")  # writing .pth files needs PyTorch; converting them needs it too
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, path)


@pytest.mark.parametrize("variant", sorted(OFFICIAL))
def test_every_official_key_converts_with_nothing_left_over(variant):
  sd = synthetic_state_dict(variant)
  flat, dropped, unexpected = convert.convert_state_dict(sd)
  assert unexpected == []
  assert all(k in ("attn_bias_for_masking", "lvl_1L") or k.endswith("attn.zero_k_bias") for k in dropped)
  depth = 16 if variant == "var_d16" else 24
  assert len(dropped) == 2 + depth
  params = convert.convert_for_config(get_config(variant), sd)  # shapes checked against the built model
  assert sum(int(np.size(v)) for v in flat.values()) == OFFICIAL[variant]["params"]
  assert params["class_emb"].shape == (1001, 1024)


def test_wrong_depth_and_family_are_named():
  with pytest.raises(CheckpointMismatchError, match=r"VAR model of depth 16.*configs/next_scale.py:var_d16"):
    convert.convert_for_config(get_config("var_d20"), synthetic_state_dict("var_d16"))
  with pytest.raises(CheckpointMismatchError, match=r"HMAR model of depth 16"):
    convert.convert_for_config(get_config("var_d16"), synthetic_state_dict("hmar_d16"))


def test_missing_unexpected_and_shape_mismatches_are_named():
  from himar_jax import models
  from flax import nnx
  fx = fixture("var_logits.npz")
  sd = {k[3:]: v for k, v in fx.items() if k.startswith("sd/")}
  del sd["blocks.1.attn.q_bias"]
  sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
  sd["head.bias"] = np.zeros(17, np.float32)
  model = models.model_fn(get_config("var_tiny"))(nnx.Rngs(0))
  with pytest.raises(CheckpointMismatchError) as e:
    convert.load_into(model, sd)
  msg = str(e.value)
  assert "missing: blocks.1.attn.q_bias" in msg and "unexpected key: blocks.0.attn.extra" in msg
  assert "shape: head.head.bias is (16,) in the model, (17,)" in msg


def test_convert_restore_reproduces_official_logits(tmp_path):
  """tiny var/hmar configs are the fixture's sizes: .pth -> convert -> orbax -> restore -> teacher-forced logits."""
  for kind, name in (("var", "var_logits.npz"), ("hmar", "hmar_logits.npz")):
    fx = fixture(name)
    src, vae = str(tmp_path / f"{kind}.pth"), str(tmp_path / f"{kind}_vae.pth")
    save_pth(src, {k[3:]: v for k, v in fx.items() if k.startswith("sd/")})
    save_pth(vae, {"quantize." + k[3:]: v for k, v in fx.items() if k.startswith("vq/")})
    config = get_config(f"{kind}_tiny")
    config.model.tokenizer = vae
    out = str(tmp_path / f"{kind}_ckpt")
    convert.convert_checkpoint(src, out, config)
    model = sampling.restore_model_for_sampling(config, out).module()
    idx, labels = jnp.asarray(fx["indices"]), jnp.asarray(fx["labels"])
    x_ns = model.vq.next_scale_inputs(model.split_scales(idx))
    logits = np.asarray(jax.jit(model.logits)(labels, x_ns))
    ref = fx["logits"] if kind == "var" else fx["ns_logits"]
    assert np.max(np.abs(logits - ref)) / np.max(np.abs(ref)) < 1e-4
    with pytest.raises(FileExistsError):
      convert.convert_checkpoint(src, out, config)


def test_bad_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="var_d16.pth"):
    convert.read_state_dict(str(tmp_path / "nope.pth"))
  config = get_config("var_tiny")
  with pytest.raises(ValueError, match="config.model.tokenizer is empty"):
    convert.convert_checkpoint(str(tmp_path / "x.pth"), str(tmp_path / "o"), config)
  bad = str(tmp_path / "vae.pth")
  save_pth(bad, {"quantize.embedding.weight": np.zeros((32, 4), np.float32)})
  config.model.tokenizer = bad
  from himar_jax import models
  from flax import nnx
  with pytest.raises(CheckpointMismatchError, match=r"shape: vq.embedding.embedding is \(16, 4\)"):
    models.model_fn(config)(nnx.Rngs(0))
