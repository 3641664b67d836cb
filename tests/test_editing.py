"""Editing (himar_jax/editing.py and the samplers' known-token hooks): inpainting / outpainting / class change."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from himar_jax import editing, sampling, tokenizers
from himar_jax.convert import tokenizers as conv
from himar_jax.models.himar import KnownMaskSchedule, MaskSchedule, cosine_mask_lengths
from test_sample_cli import VQ_TINY, himar_setup, save_random_checkpoint  # noqa: F401  (fixture)


def test_known_schedule_predicts_each_unknown_token_once():
  """Closed form: row b with u unknown tokens predicts cosine_mask_lengths(u, K) differences, each unknown token
  exactly once, never a known one; with nothing known it is MaskSchedule itself."""
  n, k_steps = 12, 4
  rng = np.random.default_rng(0)
  known = np.zeros((3, n), bool)
  known[1, [0, 3, 4, 9]] = True
  known[2, :11] = True  # one unknown token
  base = MaskSchedule(n, k_steps, cfg=3.0)
  ranks = jnp.asarray(np.argsort(np.stack([rng.permutation(n) for _ in range(3)]), axis=-1))
  sched, new_ranks = base.with_known(ranks, jnp.asarray(known))
  assert isinstance(sched, KnownMaskSchedule)
  for b in range(3):
    u = int((~known[b]).sum())
    lengths = cosine_mask_lengths(u, k_steps) if u else np.zeros(k_steps, int)
    counts = np.zeros(n, int)
    left = u
    for k in range(k_steps):
      mask, pred = (np.asarray(a)[b] for a in sched.masks(new_ranks, k))
      assert not (mask & known[b]).any()          # known tokens are visible at every step
      assert pred.sum() == left - lengths[k] and pred.sum() <= sched.capacity
      counts += pred
      left = lengths[k]
    assert (counts == ~known[b]).all()
    # the unknown tokens keep their relative order
    unknown = np.flatnonzero(~known[b])
    assert (np.argsort(np.asarray(new_ranks)[b][unknown]) == np.argsort(np.asarray(ranks)[b][unknown])).all()
  # nothing known: the same masks as the plain schedule, step by step
  none, same = base.with_known(ranks, jnp.zeros((3, n), bool))
  np.testing.assert_array_equal(np.asarray(same), np.asarray(ranks))
  for k in range(k_steps):
    for a, c in zip(none.masks(same, k), base.masks(ranks, k)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match="known_mask"):
    base.with_known(ranks, jnp.zeros((3, n + 1), bool))


@pytest.fixture(scope="module")
def himar_edit(himar_setup):
  config, _, ckpt, root = himar_setup
  restored = sampling.restore_model_for_sampling(config, ckpt)
  image = np.random.default_rng(0).uniform(-1, 1, (16, 16, 1)).astype(np.float32)
  return config, restored, image, root


def test_himar_inpainting_keeps_known_tokens_exactly(himar_edit, monkeypatch):
  config, restored, image, _ = himar_edit
  generate = editing.box_mask("4,2,12,10", 16)
  from himar_jax.parallel import sharding
  seen, partitioned = [], sharding._partitioned_mesh
  monkeypatch.setattr(sharding, "_partitioned_mesh", lambda: seen.append(partitioned()) or seen[-1])
  editing._editor.cache_clear()  # trace anew
  out = editing.edit(config, restored, image, generate, label=3, num=2, seed=0)
  assert seen and all(m is not None and m.size == 8 for m in seen)  # traced under the 8-device sampling mesh
  assert out["images"].shape == (2, 16, 16, 1) and np.abs(out["images"]).max() <= 1.0
  (low, dense), (known_low, known_dense), (mask_low, mask_dense) = out["tokens"], out["known"], out["known_mask"]
  # pixels [2, 10) x [4, 12): dense tokens (stride 2) rows 1..4, cols 2..5 generated; pivots (4 px) rows 0..2,
  # cols 1..2 touch the box -> generated, the rest kept
  expect_dense = np.ones((8, 8), bool)
  expect_dense[1:5, 2:6] = False
  expect_low = np.ones((4, 4), bool)
  expect_low[0:3, 1:3] = False
  np.testing.assert_array_equal(mask_dense[0].reshape(8, 8), expect_dense)
  np.testing.assert_array_equal(mask_low[0].reshape(4, 4), expect_low)
  np.testing.assert_array_equal(dense[mask_dense], known_dense[mask_dense])  # bit-exact
  np.testing.assert_array_equal(low[mask_low], known_low[mask_low])
  assert not np.allclose(dense[~mask_dense], known_dense[~mask_dense])
  assert not np.allclose(dense[0][~mask_dense[0]], dense[1][~mask_dense[1]])  # two keys, two edits
  # class-conditional editing: another label, same keys -> the same kept tokens, other generated ones
  other = editing.edit(config, restored, image, generate, label=7, num=2, seed=0)
  np.testing.assert_array_equal(other["tokens"][1][mask_dense], known_dense[mask_dense])
  assert not np.allclose(other["tokens"][1][~mask_dense], dense[~mask_dense])


def test_hmar_outpainting_keeps_known_tokens(tmp_path):
  from configs.next_scale import get_config
  vq = tokenizers.build("vq_pyramid", VQ_TINY, host_init=True, seed=1)
  conv.save_tokenizer(vq, "vq_pyramid", str(tmp_path / "vq"))
  config = get_config("hmar_tiny")
  config.model.mask_schedule = ((1,), (4,), (9,), (16,))  # no refinement pass (test_next_scale edits with them)
  config.tokenizer.checkpoint = str(tmp_path / "vq")
  save_random_checkpoint(config, str(tmp_path / "ckpt"), buffers_from=vq)
  restored = sampling.restore_model_for_sampling(config, str(tmp_path / "ckpt"))
  image = np.random.default_rng(1).uniform(-1, 1, (8, 8, 1)).astype(np.float32)
  generate = editing.generate_mask(8, box="0,0,4,8", outpaint=True)  # keep the left half
  out = editing.edit(config, restored, image, generate, label=2, num=2, seed=0)
  tokens, known, mask = out["tokens"], out["known"], out["known_mask"]
  assert out["images"].shape == (2, 8, 8, 1) and tokens.shape == (2, 30)
  want = np.asarray(jax.jit(lambda x: jnp.concatenate(vq.img_to_indices(x), axis=1))(jnp.asarray(image)[None]))[0]
  np.testing.assert_array_equal(known[0], want)  # the kept tokens are the image's own
  assert mask[0].sum() == 0 + 2 + 3 + 8  # scale 2: column 0; scale 3: column 0 (x < 8/3); scale 4: columns 0-1
  np.testing.assert_array_equal(tokens[mask], known[mask])


def test_bad_inputs_are_named(himar_edit, tmp_path):
  config, restored, image, _ = himar_edit
  with pytest.raises(FileNotFoundError, match="--image='nope.png' does not exist"):
    editing.load_image("nope.png", 16, 1)
  Image.fromarray(np.zeros((20, 16), np.uint8)).save(tmp_path / "wrong.png")
  with pytest.raises(ValueError, match="is 16x20 pixels; this model makes 16x16"):
    editing.load_image(str(tmp_path / "wrong.png"), 16, 1)
  with pytest.raises(ValueError, match="mask must have the image's size"):
    editing.load_mask(str(tmp_path / "wrong.png"), 16)
  with pytest.raises(FileNotFoundError, match="--mask="):
    editing.load_mask(str(tmp_path / "none.png"), 16)
  with pytest.raises(ValueError, match="0 <= x0 < x1 <= 16"):
    editing.box_mask("4,4,20,8", 16)
  with pytest.raises(ValueError, match="four integers"):
    editing.box_mask("4,4,8", 16)
  with pytest.raises(ValueError, match="exactly one of --mask"):
    editing.generate_mask(16)
  with pytest.raises(ValueError, match="nothing to generate"):
    editing.generate_mask(16, box="0,0,16,16", outpaint=True)
  with pytest.raises(ValueError, match=r"--label=10 is outside \[0, 10\)"):
    editing.edit(config, restored, image, editing.box_mask("0,0,4,4", 16), label=10)
  with pytest.raises(ValueError, match="mask is 8x8 but the image is 16x16"):
    editing.edit(config, restored, image, np.ones((8, 8), bool), label=1)
  with pytest.raises(ValueError, match="needs --label"):
    editing.edit_files(config, "x", str(tmp_path), image="x.png", box="0,0,1,1")


def test_edit_verb_writes_results(himar_edit):
  config, _, image, root = himar_edit
  Image.fromarray(np.rint((image[..., 0] + 1) * 127.5).astype(np.uint8)).save(root / "in.png")
  Image.fromarray(np.where(editing.box_mask("4,2,12,10", 16), 255, 0).astype(np.uint8)).save(root / "mask.png")
  flags = types.SimpleNamespace(config=config, checkpoint=str(root / "ckpt"), workdir=None, out=str(root / "edit"),
                                image=str(root / "in.png"), mask=str(root / "mask.png"), box=None, outpaint=False,
                                label=3, num=2, seed=0, step=None)
  assert editing.edit_verb(flags) == 0
  summary = json.load(open(root / "edit" / "edit.json"))
  assert summary["label"] == 3 and summary["generated_pixel_fraction"] == 64 / 256
  strip = np.asarray(Image.open(summary["strip"]))
  assert strip.shape[1] == 3 * (16 * 2 + 2) + 2  # input + two edits
  first = np.asarray(Image.open(root / "edit" / "edit_0.png"))
  assert first.shape == (16, 16)
  np.testing.assert_array_equal(strip[2:34, 2 + 34 + 0:2 + 34 + 32][::2, ::2, 0], first)  # strip tile 1 = edit 0
