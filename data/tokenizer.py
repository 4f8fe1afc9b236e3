"""Tokenizers: StarCoder's BPE through `tokenizers` (tokenizer.json), SentencePiece for small
configs.

`load_tokenizer(dir)` picks by the files present. `train_sentencepiece` builds the tiny config's
tokenizer from text the project ships (its own Python sources), so nothing is downloaded.
SentencePiece is set up for exact round trips of code: no normalisation, whitespace kept,
newline and tab as their own pieces, and byte fallback for anything unseen.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

from data.problems import InputError

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# Special ids of our SentencePiece models.
SPM_SPECIAL = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


class SentencePieceTokenizer:
  def __init__(self, model_path: str):
    import sentencepiece as spm

    self.path = model_path
    self.sp = spm.SentencePieceProcessor(model_file=model_path)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self.sp.pad_id()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
  """A `tokenizer.json` (StarCoder's byte-level BPE) through the `tokenizers` library."""

  def __init__(self, path: str, eos_token: str = "<|endoftext|>"):
    from tokenizers import Tokenizer

    self.path = path
    self.tok = Tokenizer.from_file(path)
    self._eos = self.tok.token_to_id(eos_token)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size()

  @property
  def bos_id(self):
    return self._eos

  @property
  def eos_id(self):
    return self._eos

  @property
  def pad_id(self):
    return self._eos

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(directory: str):
  """A tokenizer from a directory holding tokenizer.json or tokenizer.model."""
  d = Path(directory)
  if (d / HF_FILE).exists():
    return HFTokenizer(str(d / HF_FILE))
  if (d / SPM_FILE).exists():
    return SentencePieceTokenizer(str(d / SPM_FILE))
  raise FileNotFoundError(f"{directory}: no {HF_FILE} or {SPM_FILE}")


def builtin_corpus() -> list[str]:
  """The text the tiny tokenizer is trained on: this project's own Python sources, in a fixed
  order."""
  import configs
  import data
  import model

  texts = []
  for pkg in (model, data, configs):
    root = Path(pkg.__file__).parent
    for f in sorted(root.rglob("*.py")):
      texts.append(f.read_text())
  return texts


def _chunks(texts: Iterable[str], size: int = 2000) -> Iterable[str]:
  """Splits documents at line ends into pieces SentencePiece accepts as sentences."""
  for text in texts:
    buf = ""
    for line in text.splitlines(keepends=True):
      if len(buf) + len(line) > size and buf:
        yield buf
        buf = ""
      buf += line
    if buf:
      yield buf


def train_sentencepiece(
  texts: Iterable[str], out_dir: str, vocab_size: int = 1024, model_type: str = "bpe"
) -> SentencePieceTokenizer:
  """Trains a code-friendly SentencePiece model and writes OUT_DIR/tokenizer.model."""
  import sentencepiece as spm

  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(list(_chunks(texts))),
    model_writer=buf,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=1.0,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    split_by_whitespace=True,
    user_defined_symbols=["\n", "\t"],
    max_sentence_length=8192,
    num_threads=1,
    minloglevel=2,
    **SPM_SPECIAL,
  )
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, SPM_FILE)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)
  return SentencePieceTokenizer(path)


def resolve_tokenizer(tokenizer):
  """A tokenizer object as is, or one loaded from a tokenizer dir or a checkpoint's tokenizer/."""
  if not isinstance(tokenizer, (str, os.PathLike)):
    if not (callable(getattr(tokenizer, "encode", None)) and hasattr(tokenizer, "eos_id")):
      raise TypeError(
        f"tokenizer must be a path or have encode() and eos_id, got {type(tokenizer).__name__}"
      )
    return tokenizer
  import fsspec
  from fsspec.implementations.local import LocalFileSystem

  path = str(tokenizer).rstrip("/")
  fs, root = fsspec.core.url_to_fs(path)
  if os.path.basename(root) in (HF_FILE, SPM_FILE) and fs.isfile(root):
    root = os.path.dirname(root)  # the tokenizer file itself
  for d in (root, f"{root}/tokenizer"):
    names = [n for n in (HF_FILE, SPM_FILE) if fs.exists(f"{d}/{n}")]
    if names:
      if isinstance(fs, LocalFileSystem):
        return load_tokenizer(d)
      import tempfile  # load_tokenizer reads local files: copy them from gs:// first

      local = tempfile.mkdtemp(prefix="rrtf-tokenizer-")
      for n in names:
        fs.get(f"{d}/{n}", os.path.join(local, n))
      return load_tokenizer(local)
  raise InputError(
    f"{path}: no tokenizer ({HF_FILE} or {SPM_FILE}) in it or in its tokenizer/ subdirectory"
  )
