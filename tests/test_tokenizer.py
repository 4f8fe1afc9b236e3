"""Tokenizers: the tiny SentencePiece model round-trips code exactly; tokenizer.json loads."""

import pytest

from data.tokenizer import HFTokenizer, builtin_corpus, load_tokenizer, train_sentencepiece

CODE = (
  'def add(a, b):\n\t"""Adds.  Two  spaces."""\n'
  '    if a  >= 10:\n        return a+b  # ünïcode ✓\n\n\n'
  'class X:\n  pass\r\n' + " " * 12 + "x = [1,2,3]\n"
)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("spm")
  train_sentencepiece(builtin_corpus(), str(d), vocab_size=1024)
  return str(d)


def test_sentencepiece_round_trips_code_exactly(spm_dir):
  tok = load_tokenizer(spm_dir)
  assert tok.vocab_size == 1024 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  for text in (CODE, builtin_corpus()[0], "\t\t\n  \n", "🙂 unseen chars use byte fallback"):
    assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(CODE)) < len(CODE) / 1.5  # it actually merges pieces


def test_training_is_deterministic(spm_dir, tmp_path):
  other = train_sentencepiece(builtin_corpus(), str(tmp_path), vocab_size=1024)
  assert other.encode(CODE) == load_tokenizer(spm_dir).encode(CODE)


def test_hf_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    [CODE] * 5,
    trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, HFTokenizer) and loaded.eos_id == 0
  assert loaded.decode(loaded.encode(CODE)) == CODE


def test_missing_tokenizer(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
    load_tokenizer(str(tmp_path))


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")  # ids 0, 1, 2


def test_hf_tokenizer_takes_its_eos_from_the_checkpoint(tmp_path):
  """The EOS a checkpoint names: tokenizer_config.json's eos_token (Qwen chat <|im_end|>, Llama 3
  Instruct <|eot_id|>), as transformers reads it; else the model config's eos id; StarCoder's
  <|endoftext|> only as the last resort."""
  import json

  from transformers import AutoTokenizer

  from conftest import train_byte_bpe
  from data.problems import InputError
  from data.tokenizer import resolve_tokenizer

  texts = [CODE] * 5
  qwen = train_byte_bpe(
    texts, tmp_path / "qwen", vocab_size=300, eos_token="<|im_end|>", pad_token="<|endoftext|>"
  )
  llama = train_byte_bpe(
    texts,
    tmp_path / "llama",
    vocab_size=300,
    specials=LLAMA3_SPECIALS,
    bos_token="<|begin_of_text|>",
    eos_token={"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
  )
  for d, (bos, eos, pad) in ((qwen, (2, 2, 0)), (llama, (0, 2, 2))):
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eos, pad), d
    assert tok.eos_id == AutoTokenizer.from_pretrained(d).eos_token_id
    assert tok.decode(tok.encode(CODE)) == CODE and tok.chat_template is None
  # special_tokens_map.json alone names it too
  base = train_byte_bpe(texts, tmp_path / "llama_base", vocab_size=300, specials=LLAMA3_SPECIALS)
  assert load_tokenizer(base).eos_id is None  # nothing names one, and no <|endoftext|>
  (tmp_path / "llama_base" / "special_tokens_map.json").write_text(
    json.dumps({"eos_token": "<|end_of_text|>"})
  )
  assert load_tokenizer(base).eos_id == 1
  # a checkpoint whose tokenizer files name none: its model config's eos_token_id
  ckpt = tmp_path / "ckpt"
  train_byte_bpe(texts, ckpt / "tokenizer", vocab_size=300, specials=LLAMA3_SPECIALS)
  (ckpt / "model_config.json").write_text(json.dumps({"eos_token_id": 2}))
  assert resolve_tokenizer(str(ckpt)).eos_id == 2
  assert resolve_tokenizer(str(ckpt / "tokenizer")).eos_id == 2
  assert resolve_tokenizer(str(ckpt), eos_id=1).eos_id == 1
  # a named EOS outside the vocabulary is a one-line error
  (tmp_path / "llama_base" / "tokenizer_config.json").write_text(
    json.dumps({"eos_token": "<|im_end|>"})
  )
  with pytest.raises(InputError, match=r"the eos_token '<\|im_end\|>' is not in the vocabulary"):
    load_tokenizer(base)


def test_prompts_start_with_the_tokenizers_own_bos(tmp_path):
  """A tokenizer whose post-processor puts BOS first (Llama's, Mistral's): prompts the decoder,
  prepare and quantize encode start with it, as transformers' tokenizer(text) does; a text that
  already starts with it (a rendered chat template) gets no second one; StarCoder-style
  tokenizers without one are unchanged."""
  from tokenizers import Tokenizer, processors
  from transformers import AutoTokenizer

  from conftest import train_byte_bpe
  from data.tokenizer import encode_prompt

  d = train_byte_bpe(
    [CODE] * 5, tmp_path / "llama", vocab_size=300, specials=LLAMA3_SPECIALS,
    bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
  )  # fmt: skip
  path = f"{d}/tokenizer.json"
  plain = load_tokenizer(d)
  assert plain.bos_prefix == () and encode_prompt(plain, CODE) == plain.encode(CODE)
  tok = Tokenizer.from_file(path)
  tok.post_processor = processors.TemplateProcessing(
    single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
  )
  tok.save(path)
  llama = load_tokenizer(d)
  assert llama.bos_prefix == (0,)
  ids = encode_prompt(llama, CODE)
  assert ids == AutoTokenizer.from_pretrained(d)(CODE)["input_ids"] and ids[0] == 0
  assert encode_prompt(llama, "<|begin_of_text|>" + CODE) == ids  # not doubled
  assert llama.encode(CODE) == ids[1:]  # the text's own ids stay BOS-free (responses)


MULTIBYTE = "héllo wörld → 世界 🙂 naïve café ∑ 𝔘 ü\n\tdef f(): return 'ß'  # ✓✓"


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
  from conftest import train_byte_bpe

  texts = builtin_corpus()[:8] + [MULTIBYTE * 3]
  return HFTokenizer(
    f"{train_byte_bpe(texts, tmp_path_factory.mktemp('bpe'))}/tokenizer.json",
    eos_token="<|endoftext|>",
  )


def _streams(tok, rng, n=40):
  """Random token streams: uniform over the vocabulary (byte pieces that end mid-character,
  special tokens), and encodings of multi-byte text with random tokens spliced in."""
  import numpy as np

  v = tok.vocab_size
  out = [rng.integers(0, v, rng.integers(1, 80)).tolist() for _ in range(n)]
  base = tok.encode(MULTIBYTE + CODE)
  for _ in range(n):
    ids = list(base)
    for _ in range(rng.integers(0, 6)):
      ids.insert(int(rng.integers(0, len(ids) + 1)), int(rng.integers(0, v)))
    out.append(ids[: int(rng.integers(1, len(ids) + 1))])
  # byte pieces only (SentencePiece's <0x..> byte fallback, or BPE's single bytes) in a row
  out.append(base[: len(base) // 2] + [int(i) for i in rng.integers(0, v, 30)])
  return [np.asarray(s).tolist() for s in out]


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_bpe"])
def test_incremental_detokenizer_equals_full_decode(kind, spm_dir, byte_bpe):
  """After every chunk, the incremental text is the full re-decode's, for random chunkings of
  random streams, whatever splits multi-byte characters or pieces."""
  import numpy as np

  from data.tokenizer import IncrementalDetokenizer

  tok = load_tokenizer(spm_dir) if kind == "sentencepiece" else byte_bpe
  rng = np.random.default_rng(0)
  assert any(len(c.encode()) > 1 for c in tok.decode(tok.encode(MULTIBYTE)))
  for ids in _streams(tok, rng):
    inc, at = IncrementalDetokenizer(tok), 0
    while at < len(ids):
      step = int(rng.choice([1, 1, 2, 3, 5, 8, 32]))
      assert inc.extend(ids[at : at + step]) == tok.decode(ids[: at + step]), (ids, at, step)
      at += step
    assert inc.text == tok.decode(ids)


def test_incremental_detokenizer_without_prefix_stable_decoding():
  """A tokenizer whose text of a sequence does not extend its prefix's still gets the full
  decode (the fallback)."""
  from data.tokenizer import IncrementalDetokenizer

  class Reversed:  # the text of ids, backwards: no prefix is stable
    def decode(self, ids):
      return "".join(chr(97 + i % 26) for i in ids)[::-1]

  inc = IncrementalDetokenizer(Reversed())
  ids = list(range(40))
  for at in range(0, 40, 3):
    assert inc.extend(ids[at : at + 3]) == Reversed().decode(ids[: at + 3])
