"""Tokenizers: StarCoder's BPE through `tokenizers` (tokenizer.json), SentencePiece for small
configs.

`load_tokenizer(dir)` picks by the files present. `train_sentencepiece` builds the tiny config's
tokenizer from text the project ships (its own Python sources), so nothing is downloaded.
SentencePiece is set up for exact round trips of code: no normalisation, whitespace kept,
newline and tab as their own pieces, and byte fallback for anything unseen.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from data.chat_template import CHAT_TEMPLATE_FILE, ChatTemplate, read_chat_template
from data.problems import InputError

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# Special ids of our SentencePiece models.
SPM_SPECIAL = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


class SentencePieceTokenizer:
  chat_template = None  # our SentencePiece models ship no chat template

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


# Files beside tokenizer.json that say which of its tokens are special (EOS, ...) and how
# chats are written.
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
HF_SIDE_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE)
DEFAULT_EOS = "<|endoftext|>"  # StarCoder's (GPTBigCode, Starcoder2, Qwen base models)
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(value, dict):
    raise InputError(f"{path}: expected a JSON object")
  return value


class HFTokenizer:
  """A `tokenizer.json` (byte-level BPE: StarCoder's, Qwen's, Llama 3's) through the
  `tokenizers` library, with the special tokens and chat template of the files beside it.

  The EOS is, in order: `eos_token` if given, the tokenizer_config.json (or
  special_tokens_map.json) `eos_token` (Qwen chat: <|im_end|>, Llama 3 Instruct: <|eot_id|>),
  the id `eos_id` (a model config's), StarCoder's <|endoftext|> when the vocabulary has it.
  BOS and padding default to the EOS. `chat_template` is a data.chat_template.ChatTemplate, or
  None when the tokenizer ships no template."""

  def __init__(self, path: str, eos_token: str | None = None, *, eos_id: int | None = None):
    from tokenizers import Tokenizer

    self.path = path
    self.tok = Tokenizer.from_file(path)
    d = os.path.dirname(os.path.abspath(path))
    config = _read_json(os.path.join(d, TOKENIZER_CONFIG))
    token_map = _read_json(os.path.join(d, SPECIAL_TOKENS_MAP))
    # transformers gives tokenizer_config.json's values precedence over special_tokens_map.json
    self.special_tokens = {
      k: t for k in _SPECIAL if (t := _token_text(config.get(k)) or _token_text(token_map.get(k)))
    }
    if eos_token is not None:
      self.special_tokens["eos_token"] = eos_token
    elif "eos_token" not in self.special_tokens:
      fallback = self.tok.id_to_token(int(eos_id)) if eos_id is not None else None
      fallback = fallback or (
        DEFAULT_EOS if self.tok.token_to_id(DEFAULT_EOS) is not None else None
      )
      if fallback is not None:
        self.special_tokens["eos_token"] = fallback
    ids = {}
    for key, text in self.special_tokens.items():
      ids[key] = self.tok.token_to_id(text)
      if ids[key] is None and key in ("bos_token", "eos_token", "pad_token"):
        raise InputError(f"{path}: the {key} {text!r} is not in the vocabulary")
    self._eos = ids.get("eos_token")
    self._bos = ids.get("bos_token", self._eos)
    self._pad = ids.get("pad_token", self._eos)
    source = read_chat_template(d, config)
    self.chat_template = ChatTemplate(source, self.special_tokens) if source else None
    # What the tokenizer itself puts before a text (Llama's and Mistral's BOS; nothing for
    # StarCoder's or Qwen's): its post-processor's output with special tokens minus without.
    plain = self.tok.encode("a", add_special_tokens=False).ids
    full = self.tok.encode("a", add_special_tokens=True).ids
    cut = _find(full, plain)
    self.bos_prefix = tuple(full[:cut]) if cut is not None else ()

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size()

  @property
  def bos_id(self):
    return self._bos

  @property
  def eos_id(self):
    return self._eos

  @property
  def pad_id(self):
    return self._pad

  def encode(self, text: str) -> list[int]:
    """Ids of `text` alone (no BOS: see encode_prompt)."""
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(directory: str, *, eos_id: int | None = None):
  """A tokenizer from a directory holding tokenizer.json (with the files beside it that name
  its special tokens and chat template) or tokenizer.model. `eos_id`, a model config's, is the
  EOS of a tokenizer.json whose files name none."""
  d = Path(directory)
  if (d / HF_FILE).exists():
    return HFTokenizer(str(d / HF_FILE), eos_id=eos_id)
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
  texts: Iterable[str],
  out_dir: str,
  vocab_size: int = 1024,
  model_type: str = "bpe",
  *,
  byte_fallback: bool = True,
  character_coverage: float = 1.0,
) -> SentencePieceTokenizer:
  """Trains a code-friendly SentencePiece model and writes OUT_DIR/tokenizer.model. A vocabulary
  under 256 + the specials cannot hold the byte pieces: byte_fallback=False (unknown characters
  are <unk>), with a character_coverage below 1 so that rare characters stay out."""
  import sentencepiece as spm

  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(list(_chunks(texts))),
    model_writer=buf,
    vocab_size=vocab_size,
    model_type=model_type,
    character_coverage=character_coverage,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=byte_fallback,
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


def _checkpoint_eos(fs, root: str) -> int | None:
  """The eos_token_id of the model checkpoint at `root` (its model_config.json), if it is one."""
  path = f"{root}/model_config.json"
  if not fs.exists(path):
    return None
  try:
    with fs.open(path, "r") as f:
      eos = json.load(f).get("eos_token_id")
  except (ValueError, AttributeError):
    return None
  return eos if isinstance(eos, int) else None


def resolve_tokenizer(tokenizer, *, eos_id: int | None = None):
  """A tokenizer object as is, or one loaded from a tokenizer dir or a checkpoint's tokenizer/
  (whose model config then gives the EOS when the tokenizer's files name none; `eos_id`
  overrides that)."""
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
      if eos_id is None:  # a checkpoint (given itself or its tokenizer/): its model's EOS
        eos_id = _checkpoint_eos(fs, os.path.dirname(d) if d == root else root)
      if isinstance(fs, LocalFileSystem):
        return load_tokenizer(d, eos_id=eos_id)
      import tempfile  # load_tokenizer reads local files: copy them from gs:// first

      local = tempfile.mkdtemp(prefix="rrtf-tokenizer-")
      for n in names + [n for n in HF_SIDE_FILES if fs.exists(f"{d}/{n}")]:
        fs.get(f"{d}/{n}", os.path.join(local, n))
      return load_tokenizer(local, eos_id=eos_id)
  raise InputError(
    f"{path}: no tokenizer ({HF_FILE} or {SPM_FILE}) in it or in its tokenizer/ subdirectory"
  )


def _find(seq, sub):
  for i in range(len(seq) - len(sub) + 1):
    if seq[i : i + len(sub)] == sub:
      return i
  return None


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Ids of a prompt that starts a sequence: the tokenizer's own prefix (`bos_prefix`: Llama's
  `<s>` / `<|begin_of_text|>`) then the text, as transformers' tokenizer(text) gives them; the
  prefix is not doubled when the text already starts with it (a chat template writes it)."""
  ids = list(tokenizer.encode(text))
  prefix = list(getattr(tokenizer, "bos_prefix", ()))
  if prefix and ids[: len(prefix)] != prefix:
    ids = prefix + ids
  return ids


class IncrementalDetokenizer:
  """The text of a growing token sequence, decoding only what is new: `extend(ids)` after each
  chunk, then `text` equals `tokenizer.decode(all ids so far)`.

  A token's text can depend on its neighbours: a byte-level BPE or byte-fallback piece may be
  part of a UTF-8 character that the next token completes, and SentencePiece drops the space
  of a sequence's first piece. So, as vLLM's incremental detokenizer does, every call decodes
  a window that starts some tokens back, at `prefix`, and keeps what the window adds to the
  text of its first `read - prefix` tokens; text that ends in U+FFFD (a character still
  incomplete) stays an uncommitted tail, redone by the next call, and the window moves on only
  past committed text. A window whose text does not extend its prefix's (a tokenizer that is
  not prefix-stable there) falls back to decoding everything."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self.committed = ""  # the text of ids[:read]
    self.tail = ""  # the text ids[read:] add, while it ends in an incomplete character
    self.prefix = 0  # the window's start
    self.read = 0  # tokens whose text is committed

  @property
  def text(self) -> str:
    return self.committed + self.tail

  def extend(self, ids: Sequence[int]) -> str:
    """Appends `ids`; returns the whole text so far."""
    self.ids.extend(int(i) for i in ids)
    decode = self.tokenizer.decode
    before = decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
    window = decode(self.ids[self.prefix :])
    if not window.startswith(before):  # not prefix-stable here: decode it all
      before, window = self.committed, decode(self.ids)
      self.prefix = 0
      if not window.startswith(before):
        self.committed, self.tail, self.read = "", window, 0
        return self.text
    new = window[len(before) :]
    if new.endswith("\ufffd"):
      self.tail = new
    else:
      self.committed, self.tail = self.committed + new, ""
      self.prefix, self.read = self.read, len(self.ids)
    return self.text
