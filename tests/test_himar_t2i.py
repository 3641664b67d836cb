"""Text-to-image Hi-MAR: Beta(4, 1) mask ratios, caption -> context tokens and the empty-caption (CFG) branch,
train steps through the real trainer on a tiny COCO caption cache, sampling from a prompt file. The trained
checkpoint is shared by the tests (one train-step and one sampler compilation for the module)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coco_tiny import cached_coco
from himar_jax import models, sample_cli, sampling
from himar_jax.data import coco
from himar_jax.models import himar_t2i
from himar_jax.models.himar import masks_from_orders
from himar_jax.train import loop


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  data = cached_coco()
  config = data["config"]
  config.train.num_steps = 2
  workdir = str(tmp_path_factory.mktemp("t2i_run"))
  state = loop.train(config, workdir)
  # Sampling needs no cache: the empty caption comes from the checkpoint's buffers.
  sampler_config = config.copy_and_resolve_references()
  sampler_config.data.cache_dir = ""
  restored = sampling.restore_model_for_sampling(sampler_config, loop.checkpoint_dir(workdir))
  return dict(data, state=state, workdir=workdir, ckpt=loop.checkpoint_dir(workdir), sampler_config=sampler_config,
              restored=restored, empty=coco.read_empty_context(data["dir"]))


def test_train_steps_through_the_trainer(trained):
  state = trained["state"]
  assert int(state.step) == 2 and int(state.nonfinite_step) == -1
  np.testing.assert_array_equal(np.asarray(state.buffers["empty_context"]), trained["empty"])
  assert "context_proj" in state.params and "class_emb" not in state.params
  assert os.path.isdir(os.path.join(trained["ckpt"], "2"))
  np.testing.assert_array_equal(np.asarray(trained["restored"].buffers["empty_context"]), trained["empty"])


def test_build_and_validate(trained, tmp_path):
  config = trained["config"]
  model = nnx.eval_shape(lambda: models.model_fn(config)(nnx.Rngs(0)))
  assert model.buffer_size == 77 and model.lowres_capacity == 15 and not hasattr(model, "class_emb")
  bad = config.copy_and_resolve_references()
  bad.model.mask_ratio_beta = (4.0, 0.0)
  with pytest.raises(ValueError, match="mask_ratio_beta"):
    himar_t2i.validate(bad)
  bad = config.copy_and_resolve_references()
  bad.data.cache_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="empty_context.npy not found"):
    nnx.eval_shape(lambda: models.model_fn(bad)(nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"context \(B, 77, 32\)"):
    trained["restored"].module().project_context(jnp.zeros((2, 76, 32)))
  with pytest.raises(ValueError, match="need 'context'"):
    trained["restored"].module().train_loss({"latent": jnp.zeros((1, 8, 8, 4))}, key=jax.random.key(0))


def test_mask_counts_follow_beta_4_1(trained):
  model = nnx.eval_shape(lambda: models.model_fn(trained["sampler_config"])(nnx.Rngs(0)))  # draws need no weights
  keys = jax.random.split(jax.random.key(3), 4000)

  @jax.jit
  def draw(keys, key):
    k_low, k_dense = jax.random.split(jax.random.fold_in(key, 0x7e47))
    return (jax.vmap(lambda k: model.masked_count(k, 100_000))(keys), jax.vmap(lambda k: model.masked_count(k, 16))(
        keys[:500]), model.draw_training(key, 8), model.masked_count(k_low, 16), model.masked_count(k_dense, 64))

  fine, counts, draws, low, dense = jax.device_get(draw(keys, jax.random.key(5)))
  r = np.sort(fine) / 100_000
  # Kolmogorov-Smirnov distance to the Beta(4, 1) CDF x^4 (critical value at 0.1%: 1.95 / sqrt(4000) = 0.031)
  ks = max(np.max(np.arange(1, 4001) / 4000 - r ** 4), np.max(r ** 4 - np.arange(4000) / 4000))
  assert ks < 0.031, ks
  assert abs(r.mean() - 0.8) < 0.01
  assert counts.min() >= 1 and counts.max() <= 16 and (counts == 16).any()
  # Both phases' counts in the training draws are these Beta draws (keys folded off the step key).
  assert int(draws["num_masked_low"]) == int(low) and int(draws["num_masked_dense"]) == int(dense)
  mask = masks_from_orders(draws["order_low"], draws["num_masked_low"])
  assert (np.asarray(mask.sum(-1)) == int(low)).all()


def test_context_tokens_and_empty_caption_branch(trained):
  model = trained["restored"].module()
  rng = np.random.default_rng(0)
  context = rng.standard_normal((3, 77, 32)).astype(np.float32)
  w = np.asarray(model.context_proj.kernel[...], np.float64)
  b = np.asarray(model.context_proj.bias[...], np.float64)
  proj = lambda x: x.astype(np.float64) @ w + b
  cond = np.asarray(model.condition({"context": jnp.asarray(context)}, jnp.asarray([True, False, True])))
  for row, dropped in enumerate([True, False, True]):
    np.testing.assert_allclose(cond[row], proj(trained["empty"] if dropped else context[row]), rtol=1e-5, atol=1e-5)
  c, u = model.sampling_conditions(jnp.asarray(context))
  np.testing.assert_allclose(np.asarray(c), proj(context), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(u), np.broadcast_to(proj(trained["empty"]), u.shape), rtol=1e-5, atol=1e-5)


def test_guidance_with_the_empty_caption_is_the_identity(trained):
  """CFG mixes the caption branch with the empty-caption branch: for the empty caption both branches agree, so
  the guided samples equal the unguided ones; for another caption they differ."""
  config, restored = trained["sampler_config"], trained["restored"]
  # After two steps the heads' zero-initialised output layers still nearly ignore their condition: redraw weights.
  leaves, treedef = jax.tree.flatten(restored.params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  noisy = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  noisy = dataclasses.replace(restored, params=noisy)
  decoder = sampling.load_image_decoder(config, noisy)
  other = np.random.default_rng(1).standard_normal((2, 77, 32)).astype(np.float32)
  contexts = np.concatenate([np.stack([trained["empty"]] * 2), other])
  guided_kwargs = models.family_module(config).sample_kwargs(config)  # the prompt sampler's program, reused below
  assert guided_kwargs["cfg"] != 1.0 and guided_kwargs["re_cfg"] != 1.0
  guided = sampling.sample_batches(noisy, contexts, seed=0, decoder=decoder, **guided_kwargs)
  plain = sampling.sample_batches(noisy, contexts, seed=0, decoder=decoder, **dict(guided_kwargs, cfg=1.0, re_cfg=1.0))
  assert guided.shape == (4, 16, 16, 3) and np.isfinite(guided).all()
  np.testing.assert_allclose(guided[:2], plain[:2], atol=1e-4)
  assert np.abs(guided[2:] - plain[2:]).max() > 1e-2


def test_sample_from_prompts_through_the_verb(trained, tmp_path, caplog):
  config, ckpt = trained["sampler_config"], trained["ckpt"]
  prompts = tmp_path / "prompts.txt"
  long = " ".join(["a cat sitting on a laptop keyboard"] * 12)
  prompts.write_text("a red square\n\n  two dogs in the park  \n" + long + "\n", encoding="utf-8")
  out = str(tmp_path / "samples")
  with caplog.at_level("WARNING"):
    grid = sample_cli.sample_prompts(config, ckpt, str(prompts), out, per_prompt=2, seed=3)
  assert any("truncated" in r.getMessage() for r in caplog.records)
  assert grid == os.path.join(out, "prompts_grid.png") and os.path.isfile(grid)
  with np.load(os.path.join(out, "prompts_samples.npz")) as f:
    images, rows, names = f["arr_0"], f["arr_1"], f["prompts"]
  assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
  assert rows.tolist() == [0, 0, 1, 1, 2, 2] and names.tolist()[:2] == ["a red square", "two dogs in the park"]
  with open(os.path.join(out, "prompts.json"), encoding="utf-8") as f:
    meta = json.load(f)
  assert meta["tokens"][2] > 77 and meta["step"] == 2 and meta["seed"] == 3
  # Sample j of prompt p is the one sample_batches draws at index p * per_prompt + j.
  decoder = sampling.load_image_decoder(config, trained["restored"])
  from himar_jax.evaluation.images import to_uint8
  from himar_jax.text.clip import TextEmbedder
  context = TextEmbedder.from_dir(config.text.clip, batch_size=8)(["two dogs in the park"])[0]
  kwargs = models.family_module(config).sample_kwargs(config)
  again = sampling.sample_batches(trained["restored"], np.repeat(context, 2, axis=0), seed=3, start_index=2,
                                  decoder=decoder, **kwargs)
  np.testing.assert_array_equal(to_uint8(again), images[2:4])

  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match="holds no prompt"):
    sample_cli.sample_prompts(config, ckpt, str(empty), out, per_prompt=1, seed=0)
  no_clip = config.copy_and_resolve_references()
  no_clip.text.clip = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="lacks vocab.json, merges.txt"):
    sample_cli.sample_prompts(no_clip, ckpt, str(prompts), out, per_prompt=1, seed=0)


def test_evaluation_generates_from_random_validation_captions(trained, tmp_path, monkeypatch):
  from himar_jax.data.latent_pipeline import LatentCacheSource
  from himar_jax.evaluation import evaluate as ev
  from himar_jax.evaluation.images import to_uint8

  config = trained["sampler_config"].copy_and_resolve_references()
  config.eval.captions_cache = trained["dir"]  # the tiny cache stands in for the validation split
  out = str(tmp_path / "eval")
  images, ids = ev.generate_samples(config, trained["ckpt"], out, num=6, step=2, chunk_size=4, progress=False)
  assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
  assert len(set(ids.tolist())) == 6 and ids.min() >= 0 and ids.max() < 4 * 5  # 6 distinct of 20 captions
  np.testing.assert_array_equal(ids, np.random.default_rng(0).choice(20, 6, replace=False))
  # Sample i is the sample_batches draw at index i for caption ids[i]'s cached context.
  cache = LatentCacheSource(trained["dir"])
  contexts = np.stack([cache[int(i) // 5]["context"][int(i) % 5] for i in ids[4:]])
  decoder = sampling.load_image_decoder(config, trained["restored"])
  again = sampling.sample_batches(trained["restored"], contexts, seed=int(config.sample.seed), start_index=4,
                                  decoder=decoder, **models.family_module(config).sample_kwargs(config))
  np.testing.assert_array_equal(to_uint8(again), images[4:])
  # Resumed: finished chunks are verified and kept (nothing is sampled again).
  monkeypatch.setattr(sampling, "sample_batches", lambda *a, **k: pytest.fail("resampled a finished chunk"))
  images2, ids2 = ev.generate_samples(config, trained["ckpt"], out, num=6, step=2, chunk_size=4, progress=False)
  np.testing.assert_array_equal(images2, images)
  np.testing.assert_array_equal(ids2, ids)
  # FID through the scoring path (a stand-in feature extractor; the Inception network has its own tests).
  extractor = lambda x, progress=False: {"pool": x.reshape(len(x), -1)[:, :3].astype(np.float64),
                                         "spatial": x.reshape(len(x), -1)[:, 3:6].astype(np.float64),
                                         "logits": x.reshape(len(x), -1)[:, :4].astype(np.float64)}
  ref = str(tmp_path / "ref.npz")
  np.savez(ref, arr_0=ev.load_image_source(os.path.join(trained["root"], "train2014"), image_size=16))
  scores = ev.score_inception(images, ref=ref, weights=None, out_dir=out, extractor=extractor, progress=False)
  assert np.isfinite(scores["fid"]) and scores["fid"] >= 0
  config.eval.captions_cache = ""
  with pytest.raises(ValueError, match="config.eval.captions_cache is empty"):
    ev.generate_samples(config, trained["ckpt"], str(tmp_path / "e2"), num=2, step=2, progress=False)
