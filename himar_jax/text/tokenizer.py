"""CLIP's byte-level BPE tokenizer, read from Hugging Face tokenizer files (vocab.json + merges.txt).

What it computes (OpenAI CLIP `simple_tokenizer.py`, as `transformers.CLIPTokenizer` for
openai/clip-vit-large-patch14):
- text clean-up: ftfy.fix_text when ftfy is installed (optional), HTML unescaped twice, Unicode NFC, runs of
  whitespace -> one space, stripped, lower-cased;
- pre-tokenisation with CLIP's pattern `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
  [^\\s\\p{L}\\p{N}]+` (leftmost alternative first, whitespace dropped), implemented with Unicode categories so the
  `regex` package is not needed;
- each piece's UTF-8 bytes mapped to printable characters (GPT-2's bytes_to_unicode), the last one suffixed
  with `</w>`, then merged greedily by merge rank;
- ids = [<|startoftext|>] + pieces + [<|endoftext|>], truncated to `context_length` (the end token kept, with a
  warning naming the prompt) and padded with the pad token (<|endoftext|> for ViT-L/14).
"""
from __future__ import annotations

import functools
import html
import json
import logging
import os
import unicodedata
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
START, END = "<|startoftext|>", "<|endoftext|>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
TOKENIZER_FILES = ("vocab.json", "merges.txt")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (printable Latin-1 bytes map to themselves)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _is_letter(c: str) -> bool:
  return unicodedata.category(c).startswith("L")


def _is_number(c: str) -> bool:
  return unicodedata.category(c).startswith("N")


def pre_tokenize(text: str) -> list[str]:
  """CLIP's regex split: special tokens, contractions, letter runs, single numerals, other-symbol runs."""
  out, i, n = [], 0, len(text)
  while i < n:
    c = text[i]
    if c.isspace():
      i += 1
      continue
    special = next((s for s in (START, END) if text.startswith(s, i)), None)
    if special:
      out.append(special)
      i += len(special)
      continue
    if c == "'":
      contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
      if contraction:
        out.append(contraction)
        i += len(contraction)
        continue
    j = i + 1
    if _is_letter(c):
      while j < n and _is_letter(text[j]):
        j += 1
    elif not _is_number(c):
      while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
        j += 1
    out.append(text[i:j])
    i = j
  return out


def clean_text(text: str) -> str:
  try:
    import ftfy  # optional, as in OpenAI CLIP
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text)).strip()
  text = unicodedata.normalize("NFC", text)
  return " ".join(text.split()).lower()


class ClipTokenizer:
  """CLIP BPE over a vocab (str -> id) and ranked merges; `tokenize` gives (B, context_length) int32 ids."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, context_length: int = CONTEXT_LENGTH,
               pad_token: str = END):
    for token in (START, END, pad_token):
      if token not in vocab:
        raise ValueError(f"the tokenizer vocabulary has no {token!r}; these files are not a CLIP tokenizer.")
    if context_length < 2:
      raise ValueError(f"context_length={context_length} must hold at least the start and end tokens.")
    self.encoder = dict(vocab)
    self.decoder = {v: k for k, v in vocab.items()}
    self.ranks = {tuple(m): i for i, m in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    self.context_length = context_length
    self.start_id, self.end_id, self.pad_id = vocab[START], vocab[END], vocab[pad_token]
    self._cache = {START: [START], END: [END]}

  @classmethod
  def from_dir(cls, path: str, *, context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
    """Reads vocab.json and merges.txt (and the pad token from special_tokens_map.json / tokenizer_config.json when
    present) from a Hugging Face tokenizer folder such as openai/clip-vit-large-patch14."""
    if not os.path.isdir(path):
      raise FileNotFoundError(f"CLIP tokenizer folder {path!r} does not exist; point it at a download of "
                              "openai/clip-vit-large-patch14 (holding vocab.json and merges.txt).")
    missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise FileNotFoundError(f"CLIP tokenizer folder {path!r} lacks {', '.join(missing)}; download them from "
                              "huggingface.co/openai/clip-vit-large-patch14 (vocab.json, merges.txt).")
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
      vocab = json.load(f)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
      raise ValueError(f"{os.path.join(path, 'merges.txt')} has lines that are not two symbols: {bad[:3]}.")
    pad = END
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      p = os.path.join(path, name)
      if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
          value = json.load(f).get("pad_token", None)
        if isinstance(value, dict):
          value = value.get("content")
        if value:
          pad = value
          break
    return cls(vocab, merges, context_length=context_length, pad_token=pad)

  def bpe(self, piece: str) -> list[str]:
    """One pre-token (already byte-mapped) -> its BPE symbols; the last carries '</w>'."""
    if piece in self._cache:
      return self._cache[piece]
    word = list(piece[:-1]) + [piece[-1] + "</w>"]
    while len(word) > 1:
      ranked = [(self.ranks.get(pair, None), i) for i, pair in enumerate(zip(word[:-1], word[1:]))]
      ranked = [(r, i) for r, i in ranked if r is not None]
      if not ranked:
        break
      best = min(ranked)[0]
      first, second = next(pair for pair in zip(word[:-1], word[1:]) if self.ranks.get(pair) == best)
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    if len(self._cache) < 100_000:
      self._cache[piece] = word
    return word

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` without start / end tokens."""
    ids = []
    for piece in pre_tokenize(clean_text(text)):
      if piece in (START, END):
        ids.append(self.encoder[piece])
        continue
      mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder.get(symbol, self.end_id) for symbol in self.bpe(mapped))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    text = "".join(self.decoder[int(i)] for i in ids if int(i) not in (self.start_id, self.end_id, self.pad_id))
    data = bytearray(self.byte_decoder[c] for c in text.replace("</w>", " ") if c in self.byte_decoder)
    return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def tokenize(self, texts: str | Sequence[str], *, warn: bool = True) -> np.ndarray:
    """(B, context_length) int32: start, ids, end, pad. Longer texts are truncated (end token kept) with a
    warning that names them."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), self.context_length), self.pad_id, np.int32)
    room = self.context_length - 2
    for row, text in enumerate(texts):
      ids = self.encode(text)
      if len(ids) > room:
        if warn:
          log.warning("prompt %r has %d tokens; CLIP reads %d, so it is truncated to %r", text[:80], len(ids) + 2,
                      self.context_length, self.decode(ids[:room]))
        ids = ids[:room]
      out[row, :len(ids) + 2] = [self.start_id, *ids, self.end_id]
    return out

  def num_tokens(self, text: str) -> int:
    """Tokens of `text` with start and end tokens, before truncation."""
    return len(self.encode(text)) + 2
