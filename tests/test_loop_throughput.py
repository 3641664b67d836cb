"""The loop's host-side fast paths give the results of the slow ones: on-device metric sums average exactly like
CLU's `Average`, the logged loss is the mean of the step losses, and the latent pipeline's batched posterior
sampling (per-record draws + one vectorised `kl_finish`) and structured-dtype record decoding equal the
per-record transform over field-by-field decoding, bit for bit."""
from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metric_writers, metrics as clu_metrics

from configs.quickstart import get_config
from himar_jax import tokenizers
from himar_jax.convert import tokenizers as conv
from himar_jax.data import latent_cache as lc
from himar_jax.data import latent_pipeline as lp
from himar_jax.train import loop
from himar_jax.train.step import make_train_step


def _clu_averages(steps):
  """The loop's former bookkeeping: a CLU Collection of Averages, single_from_model_output + merge per step."""
  collection = clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in sorted(steps[0])})
  acc = None
  for metrics in steps:
    update = collection.single_from_model_output(**metrics)
    acc = update if acc is None else acc.merge(update)
  return {k: float(v) for k, v in acc.compute().items()}


def test_metric_averages_equal_clu_average_bit_for_bit():
  rng = np.random.default_rng(0)
  steps = [{"loss": jnp.float32(rng.standard_normal() * 1e3 + 0.1),  # large + small: order-sensitive float32 sums
            "ratio": jnp.float32(rng.uniform()),
            "half": jnp.asarray(rng.uniform(), jnp.bfloat16),
            "per_row": jnp.asarray(rng.standard_normal(3), jnp.float32),
            "count": jnp.int32(rng.integers(0, 7))} for _ in range(37)]
  averages = loop.MetricAverages()
  for metrics in steps[:20]:
    averages.add(metrics)
  first = averages.pop()
  assert first == _clu_averages(steps[:20])  # exact equality, every metric
  assert averages.pop() == {}
  for metrics in steps[20:]:
    averages.add(metrics)
  second = averages.pop()
  assert second == _clu_averages(steps[20:])
  # And the closed forms: float32 running sum / count; a vector metric averages its elements.
  total = np.float32(0)
  for m in steps[20:]:
    total = np.float32(total + np.float32(m["loss"]))
  assert second["loss"] == float(total / np.float32(17))
  np.testing.assert_allclose(second["per_row"], np.mean([np.asarray(m["per_row"]) for m in steps[20:]]),
                             rtol=1e-6)
  assert second["count"] == pytest.approx(np.mean([int(m["count"]) for m in steps[20:]]), rel=1e-7)


class _RecordingWriter(metric_writers.LoggingWriter):
  def __init__(self):
    super().__init__()
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)


def test_logged_loss_is_the_mean_of_the_step_losses(fake_fashion_mnist, tmp_path, monkeypatch):
  config = get_config("tiny")
  config.data.path = fake_fashion_mnist
  config.train.update(num_steps=5, log_every=3, checkpoint_every=5, async_checkpoint=False)
  writer = _RecordingWriter()
  monkeypatch.setattr(loop.metric_writers, "create_default_writer", lambda *a, **k: writer)
  step_metrics = []

  def recording_step(setup, ema_decay, **kwargs):
    step_fn = make_train_step(setup, ema_decay, **kwargs)

    def step(state, batch):
      state, metrics = step_fn(state, batch)
      step_metrics.append(jax.device_get(metrics))
      return state, metrics

    return step

  monkeypatch.setattr(loop, "make_train_step", recording_step)
  loop.train(config, str(tmp_path / "w"))
  assert len(step_metrics) == 5
  for logged_at, steps in ((3, step_metrics[:3]), (5, step_metrics[3:])):  # the last interval is partial
    logged = writer.scalars[logged_at]
    losses = [np.float32(m["loss"]) for m in steps]
    total = losses[0]
    for x in losses[1:]:
      total = np.float32(total + x)
    assert logged["train/loss"] == float(total / np.float32(len(losses)))
    assert logged["train/loss"] == pytest.approx(np.mean(np.float64(losses)), rel=1e-6)
    assert {k: logged[f"train/{k}"] for k in steps[0]} == _clu_averages(steps)
    assert logged["train/steps_per_sec"] > 0


@pytest.fixture(scope="module")
def kl_cache(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("kl_throughput")
  kind, config = tokenizers.preset("kl_tiny_gray")
  model = tokenizers.build(kind, config, host_init=True, seed=0)
  tok_dir = str(tmp / "tok")
  conv.save_tokenizer(model, kind, tok_dir)
  rng = np.random.default_rng(1)
  images, labels = rng.integers(0, 256, (12, 12, 12, 1), dtype=np.uint8), rng.integers(0, 10, 12).astype(np.int32)
  lc.write_cache(lc.ArrayImageSource(images, labels, 16), model, kind, directory=str(tmp / "cache"),
                 tokenizer_identity=lc.tokenizer_identity(tok_dir), image_size=16, pivot_size=8, shard_size=5,
                 batch_size=8, scale_factor=0.7, progress=False)
  return str(tmp / "cache")


def _decode_field_by_field(data: bytes, fields) -> dict:
  """Reference decoding: each field read at its running byte offset."""
  out, offset = {}, 0
  for f in fields:
    out[f.name] = np.frombuffer(data, dtype=f.dtype, count=int(np.prod(f.shape, dtype=np.int64)),
                                offset=offset).reshape(f.shape)
    offset += f.nbytes
  assert offset == len(data)
  return out


class _DecodeRecordSource:
  """The cache read field by field (the reference decoding)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return _decode_field_by_field(self.source._records[index], self.source.fields)


def test_structured_decoding_equals_field_by_field_decoding(kl_cache):
  source = lp.LatentCacheSource(kl_cache)
  reference = _DecodeRecordSource(source)
  for i in range(len(source)):
    got, want = source[i], reference[i]
    assert list(got) == list(want)
    for k in want:
      assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
      np.testing.assert_array_equal(got[k], want[k])
  source._records = [b"\0" * 12]
  with pytest.raises(lc.CacheError, match="cache record has 12 bytes, the metadata's fields need"):
    source[0]


def _bits(x):
  return x.view(np.uint32) if x.dtype == np.float32 else x


def test_batched_posterior_sampling_equals_per_record_transform(kl_cache):
  """make_latent_iterator (kl_draws per record, kl_finish per batch) yields exactly the batches of the per-record
  kl_transform over field-by-field decoding, with grain's same per-record generators; resuming from its state too."""
  source = lp.LatentCacheSource(kl_cache)
  assert source.scale_factor == pytest.approx(0.7)
  reference = (grain.MapDataset.source(_DecodeRecordSource(source))[0::1].seed(5).shuffle().repeat(None)
               .random_map(lp.kl_transform(source.scale_factor)).batch(4, drop_remainder=True))
  it = lp.make_latent_iterator(kl_cache, global_batch_size=4, seed=5)
  for k in range(9):  # three epochs of 12 records
    got, want = next(it), reference[k]
    assert set(got) == set(want) == {"latent", "latent_small", "label", "index"}
    for name in want:
      assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
      np.testing.assert_array_equal(_bits(got[name]), _bits(want[name]))
  state = it.get_state()
  resumed = lp.make_latent_iterator(kl_cache, global_batch_size=4, seed=5)
  resumed.set_state(state)
  np.testing.assert_array_equal(_bits(next(resumed)["latent"]), _bits(reference[9]["latent"]))
