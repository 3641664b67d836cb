"""Hi-MAR / MAR models against the official PyTorch classes (fixtures from tests/fixtures/make_himar.py)."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.himar import get_config
from himar_jax import models
from himar_jax.convert import himar as convert
from himar_jax.models import himar

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "himar")


def _fixture(name):
  with np.load(os.path.join(FIXTURES, name), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _official_config(fx):
  """configs/himar.py:himar_tiny resized to the fixture's official tiny model."""
  c = get_config("himar_tiny")
  m = c.model
  cfg = {k[4:]: v.item() for k, v in fx.items() if k.startswith("cfg/")}
  m.num_classes = cfg["class_num"]
  m.buffer_size = cfg["buffer_size"]
  m.encoder_dim, m.encoder_depth, m.encoder_heads = (cfg["encoder_embed_dim"], cfg["encoder_depth"],
                                                     cfg["encoder_num_heads"])
  m.decoder_dim, m.decoder_depth, m.decoder_heads = (cfg["decoder_embed_dim"], cfg["decoder_depth"],
                                                     cfg["decoder_num_heads"])
  m.head_width, m.head_depth = cfg["diffloss_w"], cfg["diffloss_d"]
  m.dit_width, m.dit_depth, m.dit_heads = cfg["gdm_w"], cfg["gdm_d"], cfg["head"]
  m.lowres_grid = cfg["cond_scale"]
  m.diffusion_batch_mul = cfg["diffusion_batch_mul"]
  m.step_stage2_rate, m.step_warmup_epochs, m.steps_per_epoch = cfg["step_stage2_rate"], cfg["step_warmup"], 1
  m.dtype = "float32"
  return c


def _official_model(fx):
  config = _official_config(fx)
  model = models.model_fn(config)(nnx.Rngs(0))
  dropped = convert.load_into(model, "himar", {k[3:]: v for k, v in fx.items() if k.startswith("sd/")})
  assert sorted(dropped) == ["cond_diffloss.net.c_pos_embed", "cond_diffloss.net.pos_embed"]
  return config, model


@pytest.fixture(scope="module")
def loss_fixture():
  return _fixture("himar_losses.npz")


def test_himar_phase_losses_match_official(loss_fixture):
  fx = loss_fixture
  _, model = _official_model(fx)
  batch = {"latent": jnp.asarray(fx["latent"]), "latent_small": jnp.asarray(fx["latent_small"]),
           "label": jnp.asarray(fx["label"], jnp.int32)}
  draws = {k: jnp.asarray(fx[k]) for k in ("order_low", "order_dense", "num_masked_low", "num_masked_dense",
                                            "drop_low", "drop_dense", "null_pivots", "t_low", "noise_low",
                                            "t_dense", "noise_dense")}
  # Both null-pivot branches and both label-drop outcomes occur in the injected flags.
  assert fx["null_pivots"].any() and not fx["null_pivots"].all() and fx["drop_low"].any()
  traces = []

  @jax.jit
  def run(m, b, d):
    traces.append(1)
    return m.losses(b, d, return_z=True)

  loss_low, loss_dense, (z_low, z_dense) = run(model, batch, draws)
  # The heads' conditions (the losses alone are weakly sensitive to them at random weights).
  np.testing.assert_allclose(np.asarray(z_low), fx["z_low"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(z_dense), fx["z_dense"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(loss_low) * 2.0, fx["loss1"], rtol=1e-4)
  np.testing.assert_allclose(float(loss_dense) * 0.75, fx["loss2"], rtol=1e-4)
  # The tiny config has two phase-2 encoder capacities; the fixture's 64 + 83 visible tokens take the smaller one,
  # so the match above covers the bucketed path, and the loop below also runs the full one.
  assert model.visible_capacities(64) == (192, 320)
  # Other mask ratios (any visible-token count) reuse the same compiled step: static shapes.
  for low, dense in ((45, 1), (64, 256), (52, 100)):
    out = run(model, batch, dict(draws, num_masked_low=jnp.int32(low), num_masked_dense=jnp.int32(dense)))
    assert np.isfinite(float(out[0])) and np.isfinite(float(out[1]))
  assert len(traces) == 1
  # The fixture's epoch gives the official null-pivot probability 1 - rate * epoch / warmup.
  np.testing.assert_allclose(float(model.null_pivot_prob(int(fx["epoch"]))), 0.75, rtol=1e-6)


def test_himar_sampling_matches_official(loss_fixture):
  fx, sx = loss_fixture, _fixture("himar_sample.npz")
  _, model = _official_model(fx)
  noise = {k: jnp.asarray(sx[k]) for k in ("low_init", "low_steps", "dense_init", "dense_steps")}
  labels = jnp.asarray(sx["label"], jnp.int32)
  orders = (jnp.asarray(sx["order_low"]), jnp.asarray(sx["order_dense"]))

  @jax.jit
  def run(m, labels, orders, noise):
    return m.sample_tokens(labels, keys=jax.random.split(jax.random.key(0), labels.shape[0]),
                           num_iter=int(sx["num_iter"]), cfg=float(sx["cfg"]), re_cfg=float(sx["re_cfg"]),
                           temperature=float(sx["temperature"]), num_sampling_steps=str(sx["mlp_steps"]),
                           dit_sampling_steps=str(sx["dit_steps"]), orders=orders, noise=noise)

  low, dense = run(model, labels, orders, noise)
  np.testing.assert_allclose(np.asarray(low), sx["lowres"], rtol=1e-4, atol=1e-4 * np.abs(sx["lowres"]).max())
  np.testing.assert_allclose(np.asarray(dense), sx["dense"], rtol=1e-4, atol=1e-4 * np.abs(sx["dense"]).max())


def test_fast_preset_ddim_dit_head_ignores_step_noise_and_keeps_phase_one(loss_fixture):
  """sampling_preset=fast: phase 1 is the published sampler's, phase 2 takes deterministic DDIM steps (per-step
  noise unused; the official DDPM sampler does use it)."""
  fx, sx = loss_fixture, _fixture("himar_sample.npz")
  c, model = _official_model(fx)
  c.model.sampling_preset = "fast"
  kw = himar.sample_kwargs(c)
  assert kw["dit_sampling_method"] == "ddim" and kw["dit_sampling_steps"] == "ddim25"
  noise = {k: jnp.asarray(sx[k]) for k in ("low_init", "low_steps", "dense_init", "dense_steps")}
  labels = jnp.asarray(sx["label"], jnp.int32)
  orders = (jnp.asarray(sx["order_low"]), jnp.asarray(sx["order_dense"]))
  steps = str(sx["dit_steps"])

  @functools.partial(jax.jit, static_argnames="method")
  def run(m, noise, method):
    return m.sample_tokens(labels, keys=jax.random.split(jax.random.key(0), labels.shape[0]),
                           num_iter=int(sx["num_iter"]), cfg=float(sx["cfg"]), re_cfg=float(sx["re_cfg"]),
                           num_sampling_steps=str(sx["mlp_steps"]), dit_sampling_steps=steps,
                           dit_sampling_method=method, orders=orders, noise=noise)

  other = dict(noise, dense_steps=noise["dense_steps"] + 1.0)
  low_ddim, dense_ddim = run(model, noise, "ddim")
  _, dense_ddim2 = run(model, other, "ddim")
  _, dense_ddpm2 = run(model, other, "ddpm")
  np.testing.assert_array_equal(np.asarray(dense_ddim), np.asarray(dense_ddim2))
  np.testing.assert_allclose(np.asarray(low_ddim), sx["lowres"], rtol=1e-4, atol=1e-4 * np.abs(sx["lowres"]).max())
  assert np.all(np.isfinite(np.asarray(dense_ddim)))
  assert not np.allclose(np.asarray(dense_ddpm2), sx["dense"], atol=1e-3)  # DDPM reads the per-step noise
  c.model.sampling_preset = "turbo"
  with pytest.raises(ValueError, match="sampling_preset='turbo'"):
    himar.sample_kwargs(c)
  mar = get_config("mar_tiny")
  mar.model.sampling_preset = "fast"
  with pytest.raises(ValueError, match="only the himar family"):
    himar.sample_kwargs(mar)


def test_mar_loss_and_sampling_match_official():
  fx, sx = _fixture("mar_loss.npz"), _fixture("mar_sample.npz")
  cfg = {k[4:]: v.item() for k, v in fx.items() if k.startswith("cfg/")}
  c = get_config("mar_tiny")
  m = c.model
  m.num_classes, m.buffer_size, m.diffusion_batch_mul = cfg["class_num"], cfg["buffer_size"], cfg["diffusion_batch_mul"]
  m.encoder_dim, m.encoder_depth, m.encoder_heads = (cfg["encoder_embed_dim"], cfg["encoder_depth"],
                                                     cfg["encoder_num_heads"])
  m.decoder_dim, m.decoder_depth, m.decoder_heads = (cfg["decoder_embed_dim"], cfg["decoder_depth"],
                                                     cfg["decoder_num_heads"])
  m.head_width, m.head_depth = cfg["diffloss_w"], cfg["diffloss_d"]
  model = models.model_fn(c)(nnx.Rngs(0))
  assert convert.load_into(model, "mar", {k[3:]: v for k, v in fx.items() if k.startswith("sd/")}) == []
  batch = {"latent": jnp.asarray(fx["latent"]), "label": jnp.asarray(fx["label"], jnp.int32)}
  draws = {k: jnp.asarray(fx[k]) for k in ("orders", "num_masked", "drop", "t", "noise")}
  assert fx["drop"].any() and not fx["drop"].all()
  loss = jax.jit(lambda mm, b, d: mm.losses(b, d))(model, batch, draws)
  np.testing.assert_allclose(float(loss), fx["loss"], rtol=1e-4)

  @jax.jit
  def run(mm, labels, orders, noise):
    return mm.sample_tokens(labels, keys=jax.random.split(jax.random.key(0), labels.shape[0]),
                            num_iter=int(sx["num_iter"]), cfg=float(sx["cfg"]), temperature=float(sx["temperature"]),
                            num_sampling_steps=str(sx["mlp_steps"]), orders=orders, noise=noise)

  tokens = run(model, jnp.asarray(sx["label"], jnp.int32), jnp.asarray(sx["orders"]),
               {"init": jnp.asarray(sx["init"]), "steps": jnp.asarray(sx["steps"])})
  np.testing.assert_allclose(np.asarray(tokens), sx["tokens"], rtol=1e-4, atol=1e-4 * np.abs(sx["tokens"]).max())


def _official_schedule(n, num_iter, cfg):
  """The official loop (MAR / Hi-MAR sample_tokens) transcribed: per step the count predicted and cfg_iter."""
  mask = n
  counts, scales = [], []
  for step in range(num_iter):
    mask_len = np.floor(n * np.cos(np.pi / 2.0 * (step + 1) / num_iter))
    mask_len = max(1.0, min(mask - 1.0, mask_len))
    nxt = int(mask_len)
    counts.append(mask if step >= num_iter - 1 else mask - nxt)
    scales.append(1 + (cfg - 1) * (n - mask_len) / n)
    mask = nxt
  return counts, scales


@pytest.mark.parametrize("n,num_iter", [(64, 32), (256, 4), (256, 12), (256, 256), (4, 8)])
def test_mask_schedule_matches_official_loop(n, num_iter):
  sched = himar.MaskSchedule(n, num_iter, cfg=2.7)
  counts, scales = _official_schedule(n, num_iter, 2.7)
  ours = sched.left - sched.lengths
  np.testing.assert_array_equal(ours, counts)
  np.testing.assert_allclose([float(sched.scale(k)) for k in range(num_iter)], scales, rtol=1e-6)
  assert sched.capacity == max(counts)
  # Every token is predicted exactly once along a random order.
  ranks = jnp.asarray(np.random.default_rng(0).permutation(n))[None]
  hits = sum(np.asarray(sched.masks(ranks, k)[1]).astype(int) for k in range(num_iter))
  np.testing.assert_array_equal(hits, np.ones((1, n)))


def test_null_pivot_schedule_and_bad_inputs():
  c = get_config("himar_tiny")
  c.model.step_stage2_rate, c.model.step_warmup_epochs, c.model.steps_per_epoch = 0.25, 4, 10
  model = nnx.eval_shape(lambda: models.model_fn(c)(nnx.Rngs(0)))
  # 1 - rate * min(1, epoch / warmup) with the integer epoch step // steps_per_epoch.
  for step, prob in ((0, 1.0), (9, 1.0), (10, 0.9375), (25, 0.875), (40, 0.75), (1000, 0.75)):
    np.testing.assert_allclose(float(model.null_pivot_prob(step)), prob, rtol=1e-6)
  bad = {"latent": jnp.zeros((2, 16, 16, 16)), "latent_small": jnp.zeros((2, 16, 16, 16)),
         "label": jnp.zeros((2,), jnp.int32)}
  with pytest.raises(ValueError, match=r"latent_small \(B, 8, 8, 16\)"):
    model.train_loss(bad, key=jax.random.key(0), step=0)
  for field, value, message in (("lowres_grid", 5, "must divide grid_size"), ("dit_heads", 3, "dit_width"),
                                ("cfg_schedule", "cosine", "cfg_schedule"), ("step_stage2_rate", 1.5, "[0, 1]")):
    bad_config = get_config("himar_tiny")
    bad_config.model[field] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
      models.model_fn(bad_config)
  with pytest.raises(ValueError, match="unknown variant 'himar_xl'"):
    get_config("himar_xl")


def test_himar_sampler_rows_depend_only_on_their_keys():
  """Row b's orders and noise come from keys[b] alone: a batch reordered / resized gives the same rows."""
  c = get_config("himar_tiny")
  model = models.model_fn(c)(nnx.Rngs(0))
  kw = dict(num_iter=2, cfg=2.0, re_cfg=2.0, num_sampling_steps="2", dit_sampling_steps="2")
  sample = jax.jit(lambda m, labels, keys: m.sample_tokens(labels, keys=keys, **kw))
  keys = jax.random.split(jax.random.key(5), 3)
  low3, dense3 = sample(model, jnp.asarray([1, 2, 3]), keys)
  low2, dense2 = sample(model, jnp.asarray([3, 2]), keys[jnp.asarray([2, 1])])
  np.testing.assert_allclose(np.asarray(dense3)[[2, 1]], np.asarray(dense2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(low3)[[2, 1]], np.asarray(low2), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(dense3)[0], np.asarray(dense3)[1])


def test_end_to_end_latent_cache_train_restore_sample_decode(tmp_path):
  """Images -> tiny KL VAE latent cache -> grain -> sharded Hi-MAR train steps on a 2x2x2 mesh -> EMA -> orbax ->
  restore for sampling -> two-phase sampler -> VAE decode."""
  from himar_jax import sampling, tokenizers
  from himar_jax.convert import tokenizers as conv
  from himar_jax.data import latent_cache as lc
  from himar_jax.train import loop
  from himar_jax.train.state import init_train_state, make_train_setup
  from himar_jax.train import optimizer as opt_lib
  from himar_jax.parallel import mesh as mesh_lib

  kind, tcfg = tokenizers.preset("kl_tiny_gray")  # stride 2, 4 channels: 16 px -> 8x8x4, 8 px pivots -> 4x4x4
  tok = tokenizers.build(kind, tcfg, host_init=True, seed=0)
  tok_dir = str(tmp_path / "tok")
  conv.save_tokenizer(tok, kind, tok_dir)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 12, 12, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  lc.write_cache(lc.ArrayImageSource(images, labels, 16), tok, kind, directory=str(tmp_path / "cache"),
                 tokenizer_identity=lc.tokenizer_identity(tok_dir), image_size=16, pivot_size=8, shard_size=8,
                 batch_size=8, progress=False)
  config = get_config("himar_tiny")
  m = config.model
  m.token_dim, m.grid_size, m.lowres_grid = 4, 8, 4
  config.mesh.shape = (2, 2, 2)
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.image_size = 16
  config.optim.warmup_steps = 0
  config.train.num_steps, config.train.checkpoint_every, config.train.log_every = 2, 2, 1
  config.train.async_checkpoint, config.train.progress_bar = False, False
  setup = make_train_setup(models.model_fn(config), opt_lib.make_optimizer(config, 2),
                           mesh_lib.make_mesh(config.mesh.shape))
  init = jax.tree.map(np.asarray, init_train_state(setup, seed=config.seed).params)
  assert setup.param_shardings["encoder_blocks"][0]["mlp"]["fc1"]["kernel"].spec == \
      jax.sharding.PartitionSpec("fsdp", "tensor")
  state = loop.train(config, str(tmp_path / "run"))  # two bucketed phase-2 encoder branches, with dropout
  assert int(state.step) == 2 and int(state.nonfinite_step) == -1
  # After two steps (the heads' zero-initialised output layers move first) every part has been updated.
  for path in (("diffusion_head", "final_layer", "linear", "kernel"), ("dit_head", "x_embedder", "kernel"),
               ("cond_proj", "kernel"), ("encoder_phase_ada", "kernel"), ("z_proj", "kernel")):
    old, new = init, state.params
    for p in path:
      old, new = old[p], new[p]
    assert not np.array_equal(old, np.asarray(new)), path
  restored = sampling.restore_model_for_sampling(config, loop.checkpoint_dir(str(tmp_path / "run")))
  np.testing.assert_array_equal(np.asarray(restored.params["cond_tokens"]), np.asarray(state.ema_params["cond_tokens"]))
  latents = restored.module().sample(jnp.asarray([1, 2]), keys=jax.random.split(jax.random.key(0), 2),
                                     num_iter=2, cfg=2.0, re_cfg=2.0, num_sampling_steps="2", dit_sampling_steps="2")
  assert latents.shape == (2, 8, 8, 4)
  decoded = tok.decode_scaled(latents)
  assert decoded.shape == (2, 16, 16, 1) and np.isfinite(np.asarray(decoded)).all()


def test_rbg_and_hash_dropout_are_functions_of_the_step_key():
  """dropout_rng=rbg / hash: the same key gives the same loss, another key another one, and threefry's masks
  differ from both; bad values are named."""
  c = get_config("himar_tiny")
  batch = {"latent": jax.random.normal(jax.random.key(1), (4, 16, 16, c.model.token_dim)),
           "latent_small": jax.random.normal(jax.random.key(2), (4, 8, 8, c.model.token_dim)),
           "label": jnp.asarray([0, 1, 2, 3], jnp.int32)}

  def loss_fn(impl):
    c.model.dropout_rng, c.model.dropout = impl, 0.3
    graphdef, params, rest = nnx.split(models.model_fn(c)(nnx.Rngs(0)), nnx.Param, ...)
    # Perturbed parameters: at init the heads' zero-initialised output layers hide the backbone (and dropout).
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    fn = jax.jit(lambda p, k: nnx.merge(graphdef, p, rest).train_loss(batch, key=k, step=0)[0])
    return lambda key: float(fn(params, key))

  rbg, threefry, hashed = loss_fn("rbg"), loss_fn("threefry"), loss_fn("hash")
  k1, k2 = jax.random.key(7), jax.random.key(8)
  a, h = rbg(k1), hashed(k1)
  assert np.isfinite(a) and a == rbg(k1) and a != rbg(k2)
  assert np.isfinite(h) and h == hashed(k1) and h != hashed(k2)
  assert threefry(k1) != a and threefry(k1) != h
  c.model.dropout_rng = "philox"
  with pytest.raises(ValueError, match="dropout_rng='philox'"):
    models.model_fn(c)(nnx.Rngs(0))


def test_fused_mlp_reaches_every_mlp():
  """config.model.fused_mlp turns on the fc1 + GELU epilogue in the DiT head's MLPs (tanh form) and in the backbone
  blocks' (exact form); off, none has it."""
  from himar_jax.nn.layers import Mlp

  for flag in (True, False):
    c = get_config("himar_tiny")
    c.model.fused_mlp = flag
    model = models.model_fn(c)(nnx.Rngs(0))
    mlps = [m for _, m in nnx.iter_modules(model) if isinstance(m, Mlp)]
    forms = {m.approximate_gelu for m in mlps}
    assert forms == {True, False} and len(mlps) == (c.model.encoder_depth + c.model.decoder_depth
                                                    + c.model.dit_depth)
    assert all(m.fused_gelu == flag for m in mlps)
