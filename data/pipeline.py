"""The tokenising `prepare` stage and the training input loader (tf.data / tfds).

Letters: B prompts (b on one host), R responses per prompt, T tokens.

`prepare_stage` turns a ranked TFDS dataset (`rrtf rank`, data/records.py) into token ids in
the paper's format: the prompt between lines of triple double quotes (`prompt_text`), then
each response as the program that was executed, exec_prefix + code, and EOS.
One record per problem:
  task_id           text
  tokens            [P + sum(L)] int32  prompt ids, then every response's ids
  prompt_length     int32               P
  response_lengths  [R] int32           L_i, each including its EOS
  scores            [R] float32         RRTF scores (higher is better)
  is_teacher        [R] int32
Like `rank_stage` it writes one output shard per input shard under a temporary name, skips
finished shards on a rerun, splits input files i, i+n, ... over `--shard i --num-shards n`,
and writes the TFDS metadata (with the longest prompt) once every shard exists. Its paths
may be local or gs:// (fsspec/gcsfs, through the helpers of data/records.py).

`train_batches` reads it back per host (`tfds.split_for_jax_process`), shuffled by (seed,
epoch), and yields padded [b, R, T] batches whose T is a bucket chosen per batch; examples
are sorted by length inside windows of `window` batches to keep padding low. Each batch
comes with the `DataState` after it, from which a restarted iterator continues exactly.
The loader reads through TensorFlow (tf.io.gfile, tf.data, tfds): a gs:// dataset is read by
TensorFlow's own GCS filesystem, which cannot reach a GCS emulator, so the loader is tested
on local paths only.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from data import records
from data.problems import InputError
from data.tokenizer import HF_FILE, SPM_FILE, load_tokenizer

PREPARED_NAME = "rrtf_prepared"  # the TFDS dataset name of `rrtf prepare` output
SPLIT = "train"
SHUFFLE_BUFFER = 4096

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ prepare

def features(encoder: bool = False):
  """The tfds FeaturesDict of a prepared record.

  With `encoder`, the lists are Tensor(shape=(None,)) instead of Sequence: the same bytes on
  disk (a test checks), encoded as whole arrays instead of one element at a time (15x faster).
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds
  seq = (lambda dt: tfds.features.Tensor(shape=(None,), dtype=dt)) if encoder else tfds.features.Sequence
  return tfds.features.FeaturesDict({
      "task_id": tfds.features.Text(), "tokens": seq(tf.int32), "prompt_length": tf.int32,
      "response_lengths": seq(tf.int32), "scores": seq(tf.float32), "is_teacher": seq(tf.int32)})


def prompt_text(prompt: str) -> str:
  """The paper's training prompt: the problem between triple quotes."""
  return '"""\n' + prompt.strip("\n") + '\n"""\n'


def resolve_tokenizer(tokenizer):
  """A tokenizer object as is, or one loaded from a tokenizer dir or a checkpoint's tokenizer/."""
  if not isinstance(tokenizer, (str, os.PathLike)):
    if not (callable(getattr(tokenizer, "encode", None)) and hasattr(tokenizer, "eos_id")):
      raise TypeError(f"tokenizer must be a path or have encode() and eos_id, got {type(tokenizer).__name__}")
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
  raise InputError(f"{path}: no tokenizer ({HF_FILE} or {SPM_FILE}) in it or in its tokenizer/ subdirectory")


def prepare_record(record: dict, tokenizer) -> dict:
  """A ranked record -> a prepared record (token ids in the paper's format)."""
  eos = int(tokenizer.eos_id)
  prompt = list(tokenizer.encode(prompt_text(record["prompt"])))
  tokens, lengths = list(prompt), []
  for code in record["codes"]:
    ids = list(tokenizer.encode(record["exec_prefix"] + code)) + [eos]
    tokens += ids
    lengths.append(len(ids))
  return {"task_id": record["task_id"], "tokens": np.asarray(tokens, np.int32), "prompt_length": len(prompt),
          "response_lengths": np.asarray(lengths, np.int32), "scores": np.asarray(record["scores"], np.float32),
          "is_teacher": np.asarray(record["is_teacher"], np.int32)}


def serialize(example: dict, feats=None) -> bytes:
  """A prepared record as tf.train.Example bytes (`feats`: features(encoder=True))."""
  return records.deterministic((feats or features(encoder=True)).serialize_example(example))


def write_atomic(path: str, examples, feats=None) -> int:
  """Writes prepared records to `path` under a temporary name, renamed when complete."""
  feats = feats or features(encoder=True)
  return records.write_tfrecord_atomic(path, (serialize(ex, feats) for ex in examples))


def prompt_lengths(paths: Sequence[str]) -> np.ndarray:
  """[N] prompt_length of every record of local prepared shards, in order, reading only that field."""
  import tensorflow as tf
  if not paths:
    return np.zeros(0, np.int64)
  spec = {"prompt_length": tf.io.FixedLenFeature([], tf.int64)}
  ds = tf.data.TFRecordDataset(list(paths)).batch(4096).map(lambda x: tf.io.parse_example(x, spec)["prompt_length"])
  return np.concatenate([np.zeros(0, np.int64), *ds.as_numpy_iterator()])


def write_metadata(out_dir: str, paths: Sequence[str]) -> None:
  """dataset_info.json, features.json and metadata.json (max_prompt_length) for complete shards
  (local or a URL: records.write_tfds_metadata)."""
  import tensorflow_datasets as tfds
  infos = None
  if records.is_url(out_dir):  # one download per shard for both its prompt lengths and its counts
    lengths, infos = [], []
    for path in paths:
      with records.local_copy(path) as local:
        lengths.append(prompt_lengths([local]))
        infos.append(records.shard_info(local))
    longest = max((int(x.max(initial=0)) for x in lengths), default=0)
  else:
    longest = int(prompt_lengths(paths).max(initial=0))
  records.write_tfds_metadata(out_dir, paths, features(), shard_infos=infos,
                              metadata=tfds.core.MetadataDict(max_prompt_length=longest),
                              description="RRTF training token ids (rrtf-jax `rrtf prepare`).")


@dataclasses.dataclass
class PrepareSummary:
  shards_done: list[int] = dataclasses.field(default_factory=list)
  shards_skipped: list[int] = dataclasses.field(default_factory=list)
  problems: int = 0
  responses: int = 0
  tokens: int = 0
  empty: int = 0  # problems without responses, left out
  metadata_written: bool = False

  def report(self) -> str:
    lines = [f"prepared {self.problems} problems ({self.responses} responses, {self.tokens} tokens) in shards "
             f"{self.shards_done or '-'} (skipped, already done: {self.shards_skipped or '-'})"]
    if self.empty:
      lines.append(f"left out {self.empty} problems without responses")
    lines.append("TFDS metadata written" if self.metadata_written else
                 "TFDS metadata not written yet: other shards are missing")
    return "\n".join(lines)


def ranked_files(ranked_dir: str) -> list[str]:
  """The shards of a complete `rrtf rank` output, in order."""
  if not records.isdir(ranked_dir):
    raise InputError(f"{ranked_dir}: no such directory")
  prefix = f"{records.RANKED_NAME}-{SPLIT}.tfrecord-"
  listing = records.listdir(ranked_dir)
  names = sorted(n for n in listing if n.startswith(prefix))
  if not names:
    prepared = any(n.startswith(PREPARED_NAME) for n in listing)
    hint = " (it holds a prepared dataset)" if prepared else ""
    raise InputError(f"{ranked_dir}: no ranked TFRecords ({prefix}*){hint}; run `rrtf rank` first")
  counts = {n.rsplit("-of-", 1)[-1] for n in names}
  if len(counts) != 1 or counts != {f"{len(names):05d}"}:
    raise InputError(f"{ranked_dir}: {len(names)} ranked shards with mismatched or missing numbers; "
                     f"finish every `rrtf rank` shard first")
  return [os.path.join(ranked_dir, n) for n in names]


def _check_ranked(path: str) -> int:
  """Reads and validates every record of a ranked shard; returns the count."""
  import tensorflow as tf
  from google.protobuf.message import DecodeError
  n = 0
  try:
    for i, r in enumerate(records.read(path, ranked=True)):
      where = f"{path}: record {i}"
      try:
        records.validate(r, ranked=True, where=where)
      except ValueError as e:
        raise InputError(str(e)) from None
      if not all(math.isfinite(s) for s in r["scores"]):
        raise InputError(f"{where} ({r['task_id']}): non-finite score {r['scores']}")
      if any(t not in (0, 1) for t in r["is_teacher"]):
        raise InputError(f"{where} ({r['task_id']}): is_teacher must be 0 or 1, got {r['is_teacher']}")
      n += 1
  except tf.errors.OpError as e:
    raise InputError(f"{path}: not a readable TFRecord file ({e.message.splitlines()[0]})") from None
  except DecodeError:
    raise InputError(f"{path}: record {n} is not a tf.train.Example") from None
  return n


def prepare_stage(ranked_dir: str, out_dir: str, tokenizer, *, shard: int = 0, num_shards: int = 1,
                  progress: bool = True) -> PrepareSummary:
  """`rrtf prepare`: ranked TFDS dataset -> prepared TFDS dataset `out_dir` (PREPARED_NAME);
  both local or URLs (gs://, through fsspec: data/records.py)."""
  from tqdm import tqdm
  if not 0 <= shard < num_shards:
    raise InputError(f"--shard {shard} is not in [0, --num-shards {num_shards})")
  inputs = ranked_files(ranked_dir)
  outputs = [os.path.join(out_dir, records.shard_name(PREPARED_NAME, SPLIT, j, len(inputs)))
             for j in range(len(inputs))]
  summary = PrepareSummary()
  todo = []
  for j in range(shard, len(inputs), num_shards):
    (summary.shards_skipped if records.exists(outputs[j]) else todo).append(j)
  # Check every input before writing anything: bad input fails fast and writes nothing.
  sizes = {j: _check_ranked(inputs[j]) for j in todo}
  if todo:
    tok = resolve_tokenizer(tokenizer)
    if tok.eos_id is None:
      raise InputError(f"{getattr(tok, 'path', tokenizer)}: the tokenizer has no EOS token")
    records.makedirs(out_dir)
    feats = features(encoder=True)
    for j in todo:
      with tqdm(total=sizes[j], desc=f"prepare shard {j + 1}/{len(inputs)}", unit="problem",
                disable=not progress, dynamic_ncols=True) as bar:
        def examples():
          for r in records.read(inputs[j], ranked=True):
            bar.update(1)
            if not r["codes"]:
              summary.empty += 1
              continue
            ex = prepare_record(r, tok)
            summary.problems += 1
            summary.responses += len(ex["response_lengths"])
            summary.tokens += len(ex["tokens"])
            yield ex
        write_atomic(outputs[j], examples(), feats)
      summary.shards_done.append(j)
  if all(records.exists(p) for p in outputs):
    write_metadata(out_dir, outputs)
    summary.metadata_written = True
  return summary


# ------------------------------------------------------------------------------- loader

@dataclasses.dataclass
class DataState:
  """The data position saved with each checkpoint (JSON-able via dataclasses.asdict)."""
  epoch: int = 0
  batch: int = 0  # batches already consumed in this epoch (by every host: all hosts step together)


def default_buckets(seq_len: int) -> list[int]:
  """Powers of two from 64 below seq_len, then seq_len."""
  out, t = [], 64
  while t < seq_len:
    out.append(t)
    t *= 2
  return out + [seq_len]


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length (buckets sorted, the last one the longest allowed)."""
  for t in buckets:
    if t >= length:
      return t
  raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def select_responses(scores: np.ndarray, r: int) -> np.ndarray:
  """Indices of at most r responses, spread over the score order (best and worst kept), ascending."""
  n = len(scores)
  if n <= r:
    return np.arange(n)
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")  # best first
  return np.sort(order[np.linspace(0, n - 1, r).round().astype(int)])


def padding_fraction(batch: dict) -> float:
  """The share of [b, R, T] positions that are padding."""
  seg = batch["segment_ids"]
  return 1.0 - float(np.sum(seg)) / seg.size


def open_prepared(data_dir: str):
  """The tfds builder of a prepared dataset, or a one-line InputError saying what it is instead."""
  # tf.io.gfile, not data/records.py's fsspec helpers: tfds reads the dataset through
  # TensorFlow anyway (real GCS: TensorFlow's gs:// filesystem; tested on local paths only,
  # since TensorFlow cannot reach the GCS emulator).
  import tensorflow as tf
  import tensorflow_datasets as tfds
  if not tf.io.gfile.isdir(data_dir):
    raise InputError(f"{data_dir}: no such directory")
  names = tf.io.gfile.listdir(data_dir)
  if any(n.startswith(records.RANKED_NAME + "-") for n in names):
    raise InputError(f"{data_dir}: looks like a ranked dataset; run `rrtf prepare` first")
  if "dataset_info.json" not in names:
    if any(n.startswith(PREPARED_NAME + "-") for n in names):
      raise InputError(f"{data_dir}: no TFDS metadata (dataset_info.json): not every `rrtf prepare` shard is done")
    raise InputError(f"{data_dir}: not a prepared dataset (no {PREPARED_NAME} TFDS metadata); run `rrtf prepare`")
  try:
    builder = tfds.builder_from_directory(data_dir)
  except Exception as e:  # tfds raises a variety of errors on damaged metadata
    raise InputError(f"{data_dir}: unreadable TFDS metadata ({str(e).splitlines()[0]})") from None
  have = set(builder.info.features.keys())
  want = set(features().keys())
  if builder.info.name != PREPARED_NAME or not want <= have:
    raise InputError(f"{data_dir}: TFDS dataset {builder.info.name!r} is not an `rrtf prepare` output "
                     f"(missing features {sorted(want - have)})")
  if SPLIT not in builder.info.splits:
    raise InputError(f"{data_dir}: no {SPLIT!r} split")
  return builder


def dataset_size(data_dir: str) -> int:
  """Number of prompts in a prepared dataset (from its TFDS metadata)."""
  return int(open_prepared(data_dir).info.splits[SPLIT].num_examples)


def _epoch_seed(seed: int, epoch: int) -> int:
  # Mixed, not seed + epoch: (seed 0, epoch 1) and (seed 1, epoch 0) must differ.
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


@dataclasses.dataclass
class _Example:
  seqs: list  # R arrays (prompt + response, truncated to seq_len + 1) or None for padding
  prompt_length: int
  scores: np.ndarray  # [R] float32
  is_teacher: np.ndarray  # [R] bool
  length: int  # longest sequence


class TrainBatches:
  """The iterator `train_batches` returns; also says how many batches an epoch has.

  batches_per_epoch: every host's batches per epoch (the least over hosts).
  examples: this host's prompts per epoch; long_prompts: those skipped (prompt >= seq_len).
  buckets: the batch lengths T it may use.
  parts: the data parts (of `splits`) this host reads; task_ids_read: the task ids of the
  prompts it has drawn from them so far (what `rrtf train` records per host).
  """

  def __init__(self, data_dir: str, *, start: DataState | None = None, batch_size: int, pad_id: int,
               process_index: int | None, process_count: int | None, splits: int | None,
               agree_length: Callable[[int], int] | None, **kw):
    start = start or DataState()
    if start.epoch < 0 or start.batch < 0:
      raise ValueError(f"start must not be negative, got {start}")
    if process_index is None or process_count is None:
      import jax
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, process_count {process_count})")
    splits = splits or process_count
    if splits % process_count:
      raise ValueError(f"data splits {splits} do not divide over {process_count} processes")
    k = splits // process_count
    if batch_size < 1 or batch_size % k:
      raise ValueError(f"a host's batch of {batch_size} prompts does not split over its {k} data parts")
    self.parts = list(range(process_index * k, (process_index + 1) * k))
    self.task_ids_read: set[str] = set()
    readers = [_Reader(data_dir, batch_size=batch_size // k, pad_id=pad_id, process_index=part,
                       process_count=splits, seen=self.task_ids_read, **kw) for part in self.parts]
    self.batches_per_epoch = readers[0].batches_per_epoch  # the same for every part: the least of all
    self.examples = sum(r.examples for r in readers)
    self.long_prompts = sum(r.long_prompts for r in readers)
    self.buckets = readers[0].buckets
    # The generator holds the readers, nothing holds this object: dropping it frees the tf.data
    # iterators at once (live ones slow down interpreter exit by seconds each).
    self._it = _merged([r.generate(start) for r in readers], agree_length, int(pad_id))

  def __iter__(self):
    return self

  def __next__(self) -> tuple[dict, DataState]:
    return next(self._it)

  def close(self) -> None:
    self._it.close()


_PAD_WITH_ID = ("inputs", "targets")  # token fields padded with pad_id; the masks with 0


def _merged(gens: list, agree_length: Callable[[int], int] | None, pad_id: int) -> Iterator[tuple[dict, DataState]]:
  """The parts' batches side by side, padded to one length T: the longest part's bucket, or the
  longer length every host agrees on (`agree_length`)."""
  for items in zip(*gens):
    batches = [b for b, _ in items]
    t = max(b["inputs"].shape[-1] for b in batches)
    if agree_length is not None:
      agreed = int(agree_length(t))
      if agreed < t:
        raise ValueError(f"agree_length returned {agreed}, shorter than this host's batch length {t}")
      t = agreed
    out = {}
    for name in batches[0]:
      fill = pad_id if name in _PAD_WITH_ID else 0
      arrays = [b[name] if b[name].ndim == 2 else  # [b, R, T] token fields; scores, is_teacher are [b, R]
                np.pad(b[name], ((0, 0), (0, 0), (0, t - b[name].shape[-1])), constant_values=fill)
                for b in batches]
      out[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    yield out, items[0][1]


class _Reader:
  """A host's view of a prepared dataset: epochs in (seed, epoch) order, cut into batches."""

  def __init__(self, data_dir: str, *, batch_size: int, responses: int, seq_len: int, pad_id: int,
               seed: int, buckets: Sequence[int] | None, window: int, process_index: int, process_count: int,
               shuffle_buffer: int, seen: set[str]):
    import tensorflow_datasets as tfds
    for name, v in (("batch_size", batch_size), ("responses", responses), ("seq_len", seq_len),
                    ("window", window), ("shuffle_buffer", shuffle_buffer)):
      if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    self.data_dir, self.b, self.r, self.seq_len, self.pad_id = data_dir, batch_size, responses, seq_len, int(pad_id)
    self.seed, self.window, self.shuffle_buffer, self.seen = seed, window, shuffle_buffer, seen
    self.buckets = sorted({int(t) for t in (buckets or default_buckets(seq_len)) if 0 < t < seq_len} | {seq_len})
    self.builder = open_prepared(data_dir)
    splits = [tfds.split_for_jax_process(SPLIT, process_index=p, process_count=process_count, drop_remainder=True)
              for p in range(process_count)]
    self.split = splits[process_index]
    total = int(self.builder.info.splits[SPLIT].num_examples)
    per_host = total // process_count
    # Prompts of seq_len tokens or more leave no room for a response: they are skipped. Every
    # host must step the same number of batches per epoch, so count them on every host's split
    # (only when the metadata does not rule them out).
    longest = self.builder.info.metadata.get("max_prompt_length") if self.builder.info.metadata else None
    self.filter = longest is None or int(longest) >= seq_len
    if self.filter:
      kept = self._count_fitting(splits)
    else:
      kept = [per_host] * process_count
    self.examples = per_host
    self.long_prompts = per_host - kept[process_index]
    self.batches_per_epoch = min(kept) // batch_size
    if self.long_prompts:
      log.warning("%s: skipping %d of %d prompts on this host with >= seq_len %d tokens",
                  data_dir, self.long_prompts, per_host, seq_len)
    if self.batches_per_epoch == 0:
      raise InputError(
          f"{data_dir}: not one batch per host: {total} prompts over {process_count} hosts, at least "
          f"{min(kept)} with prompts shorter than seq_len {seq_len} on each, batch_size {batch_size}")

  def _count_fitting(self, splits) -> list[int]:
    """Per host split: prompts shorter than seq_len. One pass over the prompt lengths of all files."""
    files = [fi for fi in self.builder.info.splits[SPLIT].file_instructions if fi.take]
    offset = dict(zip([fi.filename for fi in files], np.cumsum([0] + [fi.take for fi in files])))
    fits = np.concatenate([[0], np.cumsum(prompt_lengths([fi.filename for fi in files]) < self.seq_len)])
    counts = []
    for split in splits:  # a host's split is a range of examples in each of some files
      n = 0
      for fi in self.builder.info.splits[split].file_instructions:
        a = offset[fi.filename] + fi.skip
        n += int(fits[a + fi.take] - fits[a])
      counts.append(n)
    return counts

  def _dataset(self, epoch: int, skip: int):
    """This host's examples of `epoch` in their shuffled order, the first `skip` left out."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    s = _epoch_seed(self.seed, epoch)
    options = tf.data.Options()
    options.deterministic = True
    ds = self.builder.as_dataset(split=self.split, shuffle_files=True, read_config=tfds.ReadConfig(
        shuffle_seed=s, options=options, try_autocache=False))
    ds = ds.shuffle(self.shuffle_buffer, seed=s, reshuffle_each_iteration=False)
    if self.filter:
      seq_len = self.seq_len
      ds = ds.filter(lambda ex: ex["prompt_length"] < seq_len)
    ds = ds.skip(skip)  # resuming: whole windows never reach Python
    return ds.prefetch(tf.data.AUTOTUNE)

  def _example(self, ex: dict) -> _Example:
    """One prepared record -> its R (selected or padded) truncated sequences."""
    tokens, p = ex["tokens"], int(ex["prompt_length"])
    lengths = ex["response_lengths"]
    starts = p + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    pick = select_responses(ex["scores"], self.r)
    seqs: list = [None] * self.r
    scores = np.zeros(self.r, np.float32)
    teacher = np.zeros(self.r, bool)
    for i, j in enumerate(pick):
      resp = tokens[starts[j]:starts[j] + lengths[j]]
      seqs[i] = np.concatenate([tokens[:p], resp])[:self.seq_len + 1].astype(np.int32)
      scores[i], teacher[i] = ex["scores"][j], bool(ex["is_teacher"][j])
    length = max((len(s) for s in seqs if s is not None), default=0)
    return _Example(seqs, p, scores, teacher, length)

  def _batch(self, exs: list[_Example]) -> dict:
    """[b, R, T] arrays for b examples; T the bucket of the longest input (agreed across hosts)."""
    b, r = len(exs), self.r
    longest = max(max(e.length - 1, 0) for e in exs)
    t = bucket_length(longest, self.buckets)
    inputs = np.full((b, r, t), self.pad_id, np.int32)  # [b, R, T]
    targets = np.full((b, r, t), self.pad_id, np.int32)  # [b, R, T]
    loss_mask = np.zeros((b, r, t), np.float32)  # [b, R, T]
    segment_ids = np.zeros((b, r, t), np.int32)  # [b, R, T]
    for i, e in enumerate(exs):
      for j, s in enumerate(e.seqs):
        if s is None or len(s) < 2:
          continue
        n = len(s) - 1
        inputs[i, j, :n] = s[:-1]
        targets[i, j, :n] = s[1:]
        segment_ids[i, j, :n] = 1
        loss_mask[i, j, max(e.prompt_length - 1, 0):n] = 1.0  # targets that are response tokens
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
            "scores": np.stack([e.scores for e in exs]), "is_teacher": np.stack([e.is_teacher for e in exs])}

  def _epoch(self, epoch: int, skip_batches: int) -> Iterator[tuple[dict, DataState]]:
    b, w, n = self.b, self.window, self.batches_per_epoch
    first = skip_batches // w  # whole windows to skip
    it = self._dataset(epoch, first * w * b).as_numpy_iterator()
    for wi in itertools.count(first):
      raw = list(itertools.islice(it, w * b))
      self.seen.update(ex["task_id"].decode() for ex in raw)
      full = len(raw) // b  # a final partial window keeps its full batches only
      if full == 0 or wi * w >= n:
        return
      exs = [self._example(ex) for ex in raw[:full * b]]
      order = sorted(range(len(exs)), key=lambda k: exs[k].length)  # stable
      batches = [order[k * b:(k + 1) * b] for k in range(full)]
      perm = np.random.default_rng((self.seed, epoch, wi)).permutation(full)
      for k, bi in enumerate(perm):
        index = wi * w + k
        if index >= n:  # hosts with more data stop with the one with the least
          return
        if index < skip_batches:
          continue
        yield self._batch([exs[m] for m in batches[bi]]), DataState(epoch, index + 1)

  def generate(self, start: DataState) -> Iterator[tuple[dict, DataState]]:
    epoch, k = start.epoch, start.batch
    while True:
      if k < self.batches_per_epoch:  # the state after an epoch's last batch starts the next one
        yield from self._epoch(epoch, k)
      epoch, k = epoch + 1, 0


def train_batches(data_dir: str, *, batch_size: int, responses: int, seq_len: int, pad_id: int,
                  seed: int = 0, start: DataState | None = None, buckets: Sequence[int] | None = None,
                  window: int = 8, process_index: int | None = None, process_count: int | None = None,
                  splits: int | None = None, agree_length: Callable[[int], int] | None = None,
                  shuffle_buffer: int = SHUFFLE_BUFFER) -> TrainBatches:
  """Endless (batch, DataState after it) pairs of this host's share of a prepared dataset.

  batch: inputs, targets [b, R, T] int32 (pad_id on padding); loss_mask [b, R, T] float32, 1
  where the target is a response token (its EOS included); segment_ids [b, R, T] int32, 1 on
  real input tokens; scores [b, R] float32; is_teacher [b, R] bool. Responses beyond R are
  thinned over the score order, missing ones are empty (mask 0). `start` resumes exactly.

  The dataset is cut into `splits` equal parts (default: one per process), each read, shuffled
  and bucketed on its own; a process reads only its splits / process_count parts and its batch
  is theirs side by side. So with `splits` fixed, the global batches (every host's rows in
  process order) do not depend on how many processes share them: a run resumed on a slice with
  another host count sees the same data, and one process equals several.
  """
  return TrainBatches(data_dir, batch_size=batch_size, responses=responses, seq_len=seq_len, pad_id=pad_id,
                      seed=seed, start=start, buckets=buckets, window=window, process_index=process_index,
                      process_count=process_count, splits=splits, agree_length=agree_length,
                      shuffle_buffer=shuffle_buffer)

