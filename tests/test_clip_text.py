"""CLIP text side: BPE tokenizer vs transformers.CLIPTokenizer ids, text encoder vs transformers.CLIPTextModel
(fixtures from tests/fixtures/make_clip_text.py), weight-import and input errors."""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from himar_jax.text import clip
from himar_jax.text.tokenizer import ClipTokenizer, pre_tokenize

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "clip_text")


@pytest.fixture(scope="module")
def expected():
  with open(os.path.join(FIXTURES, "expected_ids.json"), encoding="utf-8") as f:
    return json.load(f)


def test_tokenizer_matches_transformers(expected, caplog):
  tok = ClipTokenizer.from_dir(FIXTURES)
  with caplog.at_level(logging.WARNING):
    ids = tok.tokenize(expected["strings"])
  np.testing.assert_array_equal(ids, np.asarray(expected["ids"], np.int32))
  # Only the over-long prompt (the last one) is truncated, with a warning that names it.
  assert tok.num_tokens(expected["strings"][-1]) > 77
  assert all(tok.num_tokens(s) <= 77 for s in expected["strings"][:-1])
  warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
  assert len(warnings) == 1 and "a cat sitting" in warnings[0]
  assert ids[-1, -1] == tok.end_id and ids[-1, 0] == tok.start_id
  # Empty text: start, end, then padding.
  empty = tok.tokenize("")[0]
  assert empty[:2].tolist() == [tok.start_id, tok.end_id] and (empty[2:] == tok.pad_id).all()


def test_pre_tokenize_and_bpe_by_hand():
  assert pre_tokenize("they're 12 dogs!!'s <|endoftext|>x") == ["they", "'re", "1", "2", "dogs", "!!'", "s",
                                                               "<|endoftext|>", "x"]
  # merges (a, b) then (ab, c</w>): "abc" -> one symbol; in "cab" the last symbol is "b</w>", so (a, b) never
  # applies. ids: a b c = 0 1 2, with </w> 3 4 5, ab 6, abc</w> 7, start 8, end 9 (also padding).
  chars = [chr(c) for c in range(ord("a"), ord("d"))]
  vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["ab", "abc</w>", "<|startoftext|>",
                                                                            "<|endoftext|>"])}
  tok = ClipTokenizer(vocab, [("a", "b"), ("ab", "c</w>")], context_length=8)
  assert tok.bpe("abc") == ["abc</w>"]
  assert tok.bpe("cab") == ["c", "a", "b</w>"]
  assert tok.bpe("abab") == ["ab", "a", "b</w>"]
  assert tok.tokenize("ABC cab")[0].tolist() == [8, 7, 2, 0, 4, 9, 9, 9]


def test_tokenizer_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ClipTokenizer.from_dir(str(tmp_path / "nowhere"))
  shutil.copy(os.path.join(FIXTURES, "vocab.json"), tmp_path / "vocab.json")
  with pytest.raises(FileNotFoundError, match="lacks merges.txt"):
    ClipTokenizer.from_dir(str(tmp_path))
  with pytest.raises(ValueError, match="no '<|startoftext|>'"):
    ClipTokenizer({"a": 0, "<|endoftext|>": 1}, [])


def test_encoder_matches_transformers():
  out = np.load(os.path.join(FIXTURES, "outputs.npz"))
  tok, encoder = clip.load_clip_text(FIXTURES)
  assert encoder.config.width == 32 and encoder.config.layers == 2 and encoder.config.heads == 4
  # Through the batched embedder (jitted fixed-size batches of 4; the last one padded).
  hidden, pooled = clip.TextEmbedder(tok, encoder, batch_size=4).encode_ids(out["ids"])
  ref = out["last_hidden_state"]
  assert hidden.shape == ref.shape == (len(out["ids"]), 77, 32)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(hidden, ref, rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(pooled, out["pooled"], rtol=1e-4, atol=1e-4 * scale)


def _write_safetensors(path, tensors):
  header, blobs, offset = {}, [], 0
  for name, (dtype, arr) in tensors.items():
    raw = arr.tobytes()
    header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_safetensors_reader_dtypes_and_selection(tmp_path):
  x = np.asarray([[1.5, -2.25], [3.0, 0.0078125]], np.float32)
  bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # exact: these values need no rounding
  path = str(tmp_path / "t.safetensors")
  _write_safetensors(path, {"text_model.a": ("BF16", bf16), "text_model.b": ("F16", x.astype(np.float16)),
                            "vision_model.c": ("F32", x)})
  sd = clip.read_safetensors(path, prefixes=("text_model.",))
  assert sorted(sd) == ["text_model.a", "text_model.b"]
  np.testing.assert_array_equal(sd["text_model.a"], x)
  np.testing.assert_array_equal(sd["text_model.b"], x)
  assert sd["text_model.a"].dtype == np.float32


def test_weight_import_errors_name_keys(tmp_path):
  sd = clip.read_safetensors(os.path.join(FIXTURES, "model.safetensors"))
  cfg = clip.ClipTextConfig(vocab_size=578, width=32, layers=2, heads=4, mlp_width=64, eos_token_id=577)
  model = nnx.eval_shape(lambda: clip.ClipTextEncoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
  broken = dict(sd)
  broken.pop("text_model.encoder.layers.1.mlp.fc2.bias")
  broken["text_model.encoder.layers.2.mlp.fc2.bias"] = np.zeros(32, np.float32)
  with pytest.raises(clip.ClipWeightsError, match=r"missing \['text_model.encoder.layers.1.mlp.fc2.bias'\].*"
                                                 r"unexpected \['text_model.encoder.layers.2.mlp.fc2.bias'\]"):
    clip.load_hf_weights(model, broken)
  wrong = dict(sd)
  wrong["text_model.final_layer_norm.bias"] = np.zeros(31, np.float32)
  with pytest.raises(clip.ClipWeightsError, match="final_norm/bias has shape"):
    clip.load_hf_weights(model, wrong)
  # transformers >= 5 CLIPTextModel names (no prefix) and extra vision keys load the same weights.
  bare = {k[len("text_model."):]: v for k, v in sd.items()}
  bare["vision_model.embeddings.class_embedding"] = np.zeros(3, np.float32)
  clip.load_hf_weights(model, bare)
  np.testing.assert_array_equal(np.asarray(model.final_norm.bias[...]), sd["text_model.final_layer_norm.bias"])
  for name in ("vocab.json", "merges.txt", "config.json"):  # a folder without weights
    shutil.copy(os.path.join(FIXTURES, name), tmp_path / name)
  with pytest.raises(FileNotFoundError, match="no CLIP weights"):
    clip.load_clip_text(str(tmp_path))
  with pytest.raises(ValueError, match=r"must be \(B, 77\)"):
    model(jnp.zeros((2, 10), jnp.int32))


def test_config_from_hf_clip_model_files():
  # openai/clip-vit-large-patch14's config.json: a CLIPModel config, text part (partly) in text_config_dict, the
  # legacy eos_token_id 2 (HF then pools at argmax(ids), i.e. <|endoftext|> = 49407).
  cfg = clip.ClipTextConfig.from_hf({"text_config": {"hidden_size": 512, "eos_token_id": 2, "vocab_size": 49408},
                                     "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072,
                                                          "num_attention_heads": 12, "num_hidden_layers": 12}})
  assert cfg == clip.ClipTextConfig()
  with pytest.raises(ValueError, match="quick_gelu"):
    clip.ClipTextConfig.from_hf({"hidden_act": "gelu"})
