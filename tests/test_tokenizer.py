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
