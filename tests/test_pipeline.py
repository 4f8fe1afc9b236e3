"""`rrtf prepare` (ranked -> token ids, restartable, sharded) and the training loader: masks,
response selection, buckets, determinism, exact resume and per-host splits, on real tfds."""

from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest

from data import loader, records
from data.prepared import (
  PREPARED_NAME,
  dataset_size,
  features,
  prepare_record,
  prompt_text,
  serialize,
)
from data.loader import DataState, train_batches
from data.problems import InputError
from data.tokenizer import resolve_tokenizer
from rrtf_jax.stages import prepare


class ByteTokenizer:
  """Bytes + 4 as ids: lengths and token classes are known exactly (2 EOS, 3 pad)."""

  eos_id, pad_id = 2, 3

  def encode(self, text: str) -> list[int]:
    return [b + 4 for b in text.encode()]

  def decode(self, ids) -> str:
    return bytes(int(i) - 4 for i in ids if i >= 4).decode()


BYTES = ByteTokenizer()
# responses are lowercase
RESPONSE_IDS = {BYTES.eos_id} | {b + 4 for b in b"abcdefghijklmnopqrstuvwxyz"}


@pytest.fixture(scope="session")
def spm(tmp_path_factory):
  from data.tokenizer import builtin_corpus, train_sentencepiece

  return train_sentencepiece(builtin_corpus(), str(tmp_path_factory.mktemp("spm")), vocab_size=1024)


def _ranked(task_id, prompt, codes, scores=None, teacher=None, exec_prefix=""):
  n = len(codes)
  scores = [float(i) for i in range(n)] if scores is None else scores
  teacher = [0] * n if teacher is None else teacher
  return dict(
    task_id=task_id,
    prompt=prompt,
    test="",
    entry_point="f",
    exec_prefix=exec_prefix,
    responses=list(codes),
    codes=list(codes),
    sources=["m"] * n,
    is_teacher=list(teacher),
    outcomes=["passed"] * n,
    tests_passed=[1] * n,
    tests_total=[1] * n,
    scores=list(scores),
  )


def _write_ranked(d, shards, metadata=True):
  os.makedirs(d, exist_ok=True)
  for j, recs in enumerate(shards):
    records.write_atomic(
      os.path.join(d, records.shard_name(records.RANKED_NAME, "train", j, len(shards))),
      recs,
      ranked=True,
    )
  if metadata:
    records.write_ranked_metadata(str(d))
  return str(d)


def _outputs(d):
  return {
    n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if ".tfrecord" in n
  }


def _letters(k: int, upper: bool) -> str:
  a = ord("A" if upper else "a")
  return chr(a + k % 26) + chr(a + k // 26 % 26)


def _problem(k: int, long_every: int = 0):
  """Prompt: uppercase, unique, 11-45 tokens (+9 for the quotes); responses: lowercase, 1-6 of
  them."""
  n = 1 + k % 6
  prompt = "TASK" + _letters(k, True) + "X" * (5 + 7 * (k % 5))
  if long_every and k % long_every == 0:
    prompt += "L" * 200
  codes = ["r" + _letters(i, False) + "z" * ((k * 7 + i * 13) % 40) for i in range(n)]
  scores = [float((k + 3 * i) % 5) for i in range(n)]
  return _ranked(
    f"t{k}",
    prompt,
    codes,
    scores,
    [int(i == n - 1) for i in range(n)],
    exec_prefix="def f():\n"[:0],
  )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """48 problems in 3 ranked shards, prepared with the byte tokenizer."""
  root = tmp_path_factory.mktemp("prepared")
  probs = [_problem(k) for k in range(48)]
  ranked = _write_ranked(root / "ranked", [probs[:20], probs[20:30], probs[30:]])
  out = str(root / "prepared")
  assert prepare.prepare_stage(ranked, out, BYTES, progress=False).metadata_written
  return out, probs


def _take(it, n):
  return list(itertools.islice(it, n))


def _same(a, b):
  (ba, sa), (bb, sb) = a, b
  return (
    sa == sb
    and ba.keys() == bb.keys()
    and all(ba[k].dtype == bb[k].dtype and np.array_equal(ba[k], bb[k]) for k in ba)
  )


def _prompt(batch, i):
  """The prompt text of a batch row, from its first response's inputs."""
  row = batch["inputs"][i, 0][batch["segment_ids"][i, 0] == 1]
  ids = list(itertools.takewhile(lambda t: t not in RESPONSE_IDS, row))
  return BYTES.decode(ids)


# ------------------------------------------------------------------------------ prepare


def test_paper_format_round_trips_through_the_tokenizer(spm):
  rec = _ranked(
    "x/1", "\n\nWrite add(a, b).\n", ["    return a + b\n"], exec_prefix="def add(a, b):\n"
  )
  ex = prepare_record(rec, spm)
  p = ex["prompt_length"]
  assert spm.decode(ex["tokens"][:p]) == '"""\nWrite add(a, b).\n"""\n'
  resp = ex["tokens"][p:]
  assert len(resp) == ex["response_lengths"][0] and resp[-1] == spm.eos_id
  assert spm.decode(resp[:-1]) == "def add(a, b):\n    return a + b\n"
  assert list(ex["scores"]) == [0.0] and list(ex["is_teacher"]) == [0]
  assert resolve_tokenizer(spm.path).encode("x = 1") == spm.encode("x = 1")  # the file itself


def test_fast_encoder_writes_the_bytes_of_the_declared_features():
  seq, fast = features(), features(encoder=True)
  for rec in (_problem(3), _problem(5), _ranked("e", "p", [])):
    ex = prepare_record(rec, BYTES)
    as_lists = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in ex.items()}
    assert serialize(ex, fast) == serialize(as_lists, seq)


def test_prepare_writes_tfds_and_reruns_byte_identical(tmp_path, spm):
  import tensorflow_datasets as tfds

  shards = [
    [_ranked("a", "add", ["x = 1\n", "x = 2\n"], [1.0, 3.5], [0, 1], "# p\n")],
    [_ranked("b", "sub", ["y = 1\n"]), _ranked("c", "mul", [])],
    [],
  ]  # rank can leave a shard empty
  ranked = _write_ranked(tmp_path / "ranked", shards)
  tok_dir = os.path.dirname(spm.path)
  out = str(tmp_path / "out")
  s = prepare.prepare_stage(ranked, out, tok_dir, progress=False)  # a tokenizer directory
  assert (s.shards_done, s.problems, s.responses, s.empty, s.metadata_written) == (
    [0, 1, 2],
    2,
    3,
    1,
    True,
  )
  assert (
    "prepared 2 problems (3 responses" in s.report()
    and "left out 1 problems without responses" in s.report()
  )
  assert "TFDS metadata written" in s.report()
  builder = tfds.builder_from_directory(out)
  assert builder.info.name == PREPARED_NAME and dataset_size(out) == 2
  got = {ex["task_id"].decode(): ex for ex in builder.as_dataset(split="train").as_numpy_iterator()}
  a = got["a"]
  p = int(a["prompt_length"])
  assert spm.decode(a["tokens"][:p]) == '"""\nadd\n"""\n'
  first = a["tokens"][p : p + a["response_lengths"][0]]
  assert spm.decode(first[:-1]) == "# p\nx = 1\n" and first[-1] == spm.eos_id
  assert len(a["tokens"]) == p + sum(a["response_lengths"])
  assert list(a["scores"]) == [1.0, 3.5] and list(a["is_teacher"]) == [0, 1]
  assert builder.info.metadata["max_prompt_length"] == max(
    int(e["prompt_length"]) for e in got.values()
  )

  # A checkpoint directory with a tokenizer/ subdirectory works too; a rerun redoes only what is
  # missing.
  ckpt = tmp_path / "ckpt"
  (ckpt / "tokenizer").mkdir(parents=True)
  with open(spm.path, "rb") as f:
    (ckpt / "tokenizer" / "tokenizer.model").write_bytes(f.read())
  before = _outputs(out)
  os.remove(os.path.join(out, records.shard_name(PREPARED_NAME, "train", 1, 3)))
  s = prepare.prepare_stage(ranked, out, str(ckpt), progress=False)
  assert (s.shards_done, s.shards_skipped, s.metadata_written) == ([1], [0, 2], True)
  assert _outputs(out) == before and not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_prepare_shards_and_metadata_only_when_complete(tmp_path):
  ranked = _write_ranked(tmp_path / "ranked", [[_problem(k)] for k in range(3)])
  out = str(tmp_path / "out")
  s = prepare.prepare_stage(ranked, out, BYTES, shard=1, num_shards=2, progress=False)
  assert s.shards_done == [1] and not s.metadata_written and "not written yet" in s.report()
  assert sorted(_outputs(out)) == [records.shard_name(PREPARED_NAME, "train", 1, 3)]
  assert not os.path.exists(os.path.join(out, "dataset_info.json"))
  with pytest.raises(InputError, match="not every `rrtf prepare` shard is done"):
    train_batches(
      out, batch_size=1, responses=2, seq_len=64, pad_id=3, process_count=1, process_index=0
    )
  s = prepare.prepare_stage(ranked, out, BYTES, shard=0, num_shards=2, progress=False)
  assert s.shards_done == [0, 2] and s.metadata_written and len(_outputs(out)) == 3
  assert dataset_size(out) == 3


def test_prepare_bad_input_one_line_nothing_written(tmp_path, spm):
  out = str(tmp_path / "out")

  def fails(ranked, needle, tokenizer=BYTES, **kw):
    with pytest.raises(InputError) as e:
      prepare.prepare_stage(ranked, out, tokenizer, progress=False, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not os.path.exists(out)

  fails(str(tmp_path / "missing"), "missing: no such directory")
  (tmp_path / "empty").mkdir()
  fails(str(tmp_path / "empty"), "no ranked TFRecords")
  # Samples records lack the ranked fields.
  samples = tmp_path / "samples"
  samples.mkdir()
  rec = _problem(1)
  records.write_atomic(
    str(samples / records.shard_name(records.RANKED_NAME, "train", 0, 1)),
    [{k: rec[k] for k in list(records.TEXT_FIELDS) + list(records.SAMPLE_LISTS)}],
    ranked=False,
  )
  fails(
    str(samples),
    "rrtf_ranked-train.tfrecord-00000-of-00001: record 0 (t1): per-response fields differ",
  )
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / records.shard_name(records.RANKED_NAME, "train", 0, 1)).write_bytes(b"not a tfrecord")
  fails(str(corrupt), "rrtf_ranked-train.tfrecord-00000-of-00001: not a readable TFRecord")
  bad = _problem(2)
  bad["scores"][0] = float("nan")
  fails(
    _write_ranked(tmp_path / "nan", [[_problem(1), bad]], metadata=False),
    "record 1 (t2): non-finite score",
  )
  partial = _write_ranked(tmp_path / "partial", [[_problem(1)], [_problem(2)]], metadata=False)
  os.remove(os.path.join(partial, records.shard_name(records.RANKED_NAME, "train", 1, 2)))
  fails(partial, "finish every `rrtf rank` shard")
  good = _write_ranked(tmp_path / "good", [[_problem(1)]])
  fails(good, "nowhere: no tokenizer", tokenizer=str(tmp_path / "nowhere"))
  fails(good, "--shard 2 is not in [0, --num-shards 2)", shard=2, num_shards=2)


# ------------------------------------------------------------------------------- loader


def test_masks_cover_exactly_the_response_tokens(prepared):
  out, probs = prepared
  it = train_batches(
    out, batch_size=4, responses=3, seq_len=128, pad_id=3, process_count=1, process_index=0
  )
  assert it.batches_per_epoch == 12 and it.long_prompts == 0
  for batch, state in _take(it, 12):  # seq_len 128 > every prompt + response: nothing truncated
    b, r, t = batch["inputs"].shape
    assert (b, r) == (4, 3) and batch["targets"].shape == batch["loss_mask"].shape == batch[
      "segment_ids"
    ].shape
    assert batch["inputs"].dtype == batch["targets"].dtype == batch["segment_ids"].dtype == np.int32
    assert (
      batch["loss_mask"].dtype == batch["scores"].dtype == np.float32
      and batch["is_teacher"].dtype == bool
    )
    seg, mask, tgt, inp = (
      batch["segment_ids"],
      batch["loss_mask"],
      batch["targets"],
      batch["inputs"],
    )
    lengths = seg.sum(-1)  # [b, R]
    assert np.array_equal(seg, np.arange(t) < lengths[..., None])  # real tokens first, then padding
    # The loss covers every target that is a response token (EOS included) and nothing else.
    assert np.array_equal(mask == 1, np.isin(tgt, list(RESPONSE_IDS)) & (seg == 1))
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert np.all(inp[seg == 0] == 3) and np.all(tgt[seg == 0] == 3)
    # shifted by one
    assert np.array_equal(inp[..., 1:][seg[..., 1:] == 1], tgt[..., :-1][seg[..., 1:] == 1])
    ends = tgt[seg == 1].reshape(-1)
    # one EOS per real response, none truncated
    assert (ends == BYTES.eos_id).sum() == (mask.sum(-1) > 0).sum()
    assert 0 <= loader.padding_fraction(batch) < 1


def test_epoch_visits_every_prompt_once_and_responses_selected_or_padded(prepared):
  out, probs = prepared
  it = train_batches(
    out, batch_size=4, responses=3, seq_len=128, pad_id=3, process_count=1, process_index=0
  )
  by_prompt = {prompt_text(p["prompt"]): p for p in probs}
  seen = []
  for batch, _ in _take(it, it.batches_per_epoch):
    for i in range(4):
      p = by_prompt[_prompt(batch, i)]
      seen.append(p["task_id"])
      n = len(p["codes"])
      keep = loader.select_responses(np.array(p["scores"], np.float32), 3)
      real = batch["loss_mask"][i].sum(-1) > 0  # [R]
      assert list(real) == [True] * min(n, 3) + [False] * (3 - min(n, 3))
      assert list(batch["scores"][i][: len(keep)]) == [p["scores"][k] for k in keep]
      assert list(batch["is_teacher"][i][: len(keep)]) == [bool(p["is_teacher"][k]) for k in keep]
      assert (
        not batch["is_teacher"][i][len(keep) :].any()
        and not batch["segment_ids"][i][len(keep) :].any()
      )
      for j, k in enumerate(keep):
        row = batch["targets"][i, j][batch["loss_mask"][i, j] == 1]
        assert BYTES.decode(row[:-1]) == p["codes"][k] and row[-1] == BYTES.eos_id
      if n > 3:  # thinned over the score order: the best and the worst stay
        assert max(batch["scores"][i]) == max(p["scores"]) and min(batch["scores"][i]) == min(
          p["scores"]
        )
  assert sorted(seen) == sorted(p["task_id"] for p in probs)


def test_select_responses_spreads_over_scores():
  s = np.array([0.0, 3.5, 1.0, 2.2, 3.0, 0.5])
  assert list(loader.select_responses(s, 3)) == [0, 1, 3]  # best 3.5, middle 2.2, worst 0.0
  assert list(loader.select_responses(s, 1)) == [1]
  assert list(loader.select_responses(s, 6)) == list(range(6))
  assert list(loader.select_responses(s[:2], 4)) == [0, 1]
  assert list(loader.select_responses(np.ones(5), 2)) == [0, 4]  # ties: stable


def test_buckets_and_truncation(prepared):
  assert loader.default_buckets(300) == [64, 128, 256, 300]
  assert loader.default_buckets(256) == [64, 128, 256] and loader.default_buckets(40) == [40]
  assert loader.bucket_length(64, [64, 128]) == 64 and loader.bucket_length(65, [64, 128]) == 128
  out, _ = prepared
  buckets = [48, 64, 80, 200]
  it = train_batches(
    out,
    batch_size=2,
    responses=6,
    seq_len=96,
    pad_id=3,
    buckets=buckets,
    window=3,
    process_count=1,
    process_index=0,
  )
  assert it.buckets == [48, 64, 80, 96]  # seq_len is always a bucket, and the longest
  default = train_batches(
    out, batch_size=2, responses=6, seq_len=300, pad_id=3, process_count=1, process_index=0
  )
  assert default.buckets == [64, 128, 256, 300]  # no buckets given: powers of two, then seq_len
  default.close()
  used = set()
  for batch, _ in _take(it, it.batches_per_epoch):
    t = batch["inputs"].shape[-1]
    longest = batch["segment_ids"].sum(-1).max()
    assert t == min(b for b in it.buckets if b >= longest)
    used.add(t)
  assert len(used) >= 3  # windows sort by length, so short batches get short buckets
  # agree_length: every host uses the agreed (longer) length.
  it = train_batches(
    out,
    batch_size=2,
    responses=2,
    seq_len=64,
    pad_id=3,
    buckets=buckets,
    agree_length=lambda t: 64,
    process_count=1,
    process_index=0,
  )
  assert {b["inputs"].shape[-1] for b, _ in _take(it, 5)} == {64}
  # Truncation to seq_len + 1 tokens; prompts of seq_len or more are skipped and counted.
  it = train_batches(
    out, batch_size=2, responses=4, seq_len=32, pad_id=3, process_count=1, process_index=0
  )
  long = sum(1 for k in range(48) if 9 + 6 + 5 + 7 * (k % 5) >= 32)
  assert it.long_prompts == long and it.batches_per_epoch == (48 - long) // 2
  for batch, _ in _take(it, it.batches_per_epoch):
    assert batch["inputs"].shape[-1] == 32 and batch["segment_ids"].sum(-1).max() <= 32


def test_deterministic_order_and_seed_changes_it(prepared):
  out, _ = prepared
  kw = dict(
    batch_size=3, responses=2, seq_len=64, pad_id=3, window=2, process_count=1, process_index=0
  )
  a = _take(train_batches(out, seed=7, **kw), 20)
  b = _take(train_batches(out, seed=7, **kw), 20)
  assert all(_same(x, y) for x, y in zip(a, b))
  c = _take(train_batches(out, seed=8, **kw), 20)
  assert not all(_same(x, y) for x, y in zip(a, c))
  # Epochs differ in order too.
  n = train_batches(out, seed=7, **kw).batches_per_epoch
  assert [s for _, s in a[: n + 1]] == [DataState(0, i + 1) for i in range(n)] + [DataState(1, 1)]
  assert not all(_same((x[0], None), (y[0], None)) for x, y in zip(a[:n], a[n:]))


_HASH_BATCHES = """
import hashlib, itertools, sys
from data.loader import train_batches
h = hashlib.sha256()
it = train_batches(sys.argv[1], batch_size=3, responses=2, seq_len=48, pad_id=3, window=2, seed=5,
                   process_index=1, process_count=2)
for batch, state in itertools.islice(it, 12):
  for k in sorted(batch):
    h.update(batch[k].tobytes())
  h.update(repr(state).encode())
print(h.hexdigest())
"""


def test_same_order_in_another_process(prepared):
  import subprocess
  import sys

  out, _ = prepared
  env = dict(os.environ, PYTHONHASHSEED="123")
  there = subprocess.run(
    [sys.executable, "-c", _HASH_BATCHES, out],
    capture_output=True,
    text=True,
    env=env,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    check=True,
  ).stdout.split()[-1]
  import hashlib

  h = hashlib.sha256()
  it = train_batches(
    out,
    batch_size=3,
    responses=2,
    seq_len=48,
    pad_id=3,
    window=2,
    seed=5,
    process_index=1,
    process_count=2,
  )
  for batch, state in _take(it, 12):
    for k in sorted(batch):
      h.update(batch[k].tobytes())
    h.update(repr(state).encode())
  assert h.hexdigest() == there


def test_resume_is_exact_across_windows_and_epochs(prepared):
  out, _ = prepared
  kw = dict(
    batch_size=3,
    responses=3,
    seq_len=48,
    pad_id=3,
    window=2,
    seed=3,
    process_count=1,
    process_index=0,
  )
  it = train_batches(out, **kw)
  n = it.batches_per_epoch
  ref = _take(it, 2 * n + 3)
  for i in [0, 1, 2, n - 2, n - 1, n, n + 4]:  # in a window, whole windows skipped, epoch ends
    state = ref[i][1]  # the state saved after batch i
    resumed = _take(train_batches(out, start=state, **kw), 2)
    assert _same(resumed[0], ref[i + 1]) and _same(resumed[1], ref[i + 2]), (i, state)
  # The state after an epoch's last batch, (e, n), and (e + 1, 0) mean the same position.
  assert ref[n - 1][1] == DataState(0, n)
  assert _same(next(train_batches(out, start=DataState(1, 0), **kw)), ref[n])
  assert _same(next(train_batches(out, start=DataState(2, 2), **kw)), ref[2 * n + 2])
  assert dataclasses.asdict(ref[5][1]) == {"epoch": 0, "batch": 6}


def test_task_ids_read_are_the_yielded_prompts(prepared):
  """task_ids_read (what `rrtf train` records per host) holds the prompts of the batches handed
  out: not those skipped on resume, dropped with the partial final window, or still unread in
  the current window."""
  out, probs = prepared
  by_prompt = {prompt_text(p["prompt"]): p["task_id"] for p in probs}
  kw = dict(
    batch_size=5,
    responses=2,
    seq_len=64,
    pad_id=3,
    window=2,
    seed=2,
    process_count=1,
    process_index=0,
  )

  def yielded(batches):
    return {by_prompt[_prompt(b, i)] for b, _ in batches for i in range(len(b["inputs"]))}

  # 48 prompts in batches of 5: 9 batches an epoch, 3 prompts dropped with the last window.
  it = train_batches(out, **kw)
  assert it.batches_per_epoch == 9
  epoch = _take(it, 9)
  assert it.task_ids_read == yielded(epoch) and len(it.task_ids_read) == 45
  # Resumed in the middle of a window (batch 3 is its second), then stopped in the middle of the
  # next.
  it = train_batches(out, start=DataState(0, 3), **kw)
  resumed = _take(it, 2)
  assert (
    _same(resumed[0], epoch[3])
    and it.task_ids_read == yielded(resumed)
    and len(it.task_ids_read) == 10
  )


def test_hosts_split_disjoint_and_covering(prepared):
  out, probs = prepared
  kw = dict(batch_size=4, responses=2, seq_len=64, pad_id=3, window=2, process_count=2)
  seen = []
  for host in range(2):
    it = train_batches(out, process_index=host, **kw)
    assert it.examples == 24 and it.batches_per_epoch == 6
    seen.append({_prompt(b, i) for b, _ in _take(it, 6) for i in range(4)})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {prompt_text(p["prompt"]) for p in probs}


def test_fixed_splits_make_batches_independent_of_the_host_count(prepared):
  """With data splits fixed, one process's batches are the hosts' batches side by side (each
  padded to the longer length, as the hosts agree on), so a run is the same on any host count."""
  out, _ = prepared
  kw = dict(responses=2, seq_len=64, pad_id=3, window=2, seed=4)
  one = train_batches(out, batch_size=4, process_index=0, process_count=1, splits=2, **kw)
  assert one.parts == [0, 1] and one.batches_per_epoch == 12
  hosts = [
    train_batches(
      out, batch_size=2, process_index=h, process_count=2, splits=2, agree_length=lambda t: 64, **kw
    )
    for h in range(2)
  ]
  for (b, state), (b0, s0), (b1, s1) in zip(_take(one, 8), _take(hosts[0], 8), _take(hosts[1], 8)):
    assert state == s0 == s1
    for k in b:
      pad = 3 if k in ("inputs", "targets") else 0
      x = (
        b[k]
        if b[k].ndim == 2
        else np.pad(b[k], ((0, 0), (0, 0), (0, 64 - b[k].shape[-1])), constant_values=pad)
      )
      np.testing.assert_array_equal(x, np.concatenate([b0[k], b1[k]]), err_msg=k)
  assert one.task_ids_read == hosts[0].task_ids_read | hosts[1].task_ids_read
  assert not hosts[0].task_ids_read & hosts[1].task_ids_read
  # One split (the default for one process) orders the data differently: the knob matters.
  default = train_batches(out, batch_size=4, process_index=0, process_count=1, **kw)
  assert default.parts == [0]
  assert any(
    not np.array_equal(a["scores"], b["scores"])
    or a["inputs"].shape != b["inputs"].shape
    or not np.array_equal(a["inputs"], b["inputs"])
    for (a, _), (b, _) in zip(
      _take(default, 6),
      _take(train_batches(out, batch_size=4, process_index=0, process_count=1, splits=2, **kw), 6),
    )
  )
  with pytest.raises(ValueError, match="do not divide over 2 processes"):
    train_batches(out, batch_size=4, process_index=0, process_count=2, splits=3, **kw)


def test_hosts_step_together_when_long_prompts_are_skipped(tmp_path):
  # Long prompts only in the first half: host 0 has fewer usable prompts than host 1.
  probs = [_problem(k, long_every=1 if k < 6 else 0) for k in range(24)]
  ranked = _write_ranked(tmp_path / "ranked", [probs[:10], probs[10:]])  # host 0 reads both files
  out = str(tmp_path / "out")
  prepare.prepare_stage(ranked, out, BYTES, progress=False)
  kw = dict(batch_size=2, responses=2, seq_len=100, pad_id=3, process_count=2)
  its = [train_batches(out, process_index=h, **kw) for h in range(2)]
  assert [it.long_prompts for it in its] == [6, 0]
  assert [it.batches_per_epoch for it in its] == [3, 3]
  states = [[s for _, s in _take(it, 4)] for it in its]
  assert (
    states[0] == states[1] == [DataState(0, 1), DataState(0, 2), DataState(0, 3), DataState(1, 1)]
  )


def test_loader_bad_input_one_line(tmp_path, prepared):
  out, _ = prepared
  kw = dict(batch_size=2, responses=2, seq_len=64, pad_id=3, process_count=1, process_index=0)

  def fails(d, needle, **over):
    with pytest.raises(InputError) as e:
      train_batches(d, **{**kw, **over})
    assert needle in str(e.value) and str(d) in str(e.value) and "\n" not in str(e.value), str(
      e.value
    )

  fails(str(tmp_path / "missing"), "no such directory")
  ranked = _write_ranked(tmp_path / "ranked", [[_problem(1)]])
  fails(ranked, "looks like a ranked dataset; run `rrtf prepare` first")
  (tmp_path / "empty").mkdir()
  fails(str(tmp_path / "empty"), "not a prepared dataset")
  fails(out, "not one batch per host", batch_size=25, process_count=2)
  fails(out, "not one batch per host", seq_len=8)  # every prompt is too long
  with pytest.raises(ValueError, match="responses must be >= 1"):
    train_batches(out, **{**kw, "responses": 0})
