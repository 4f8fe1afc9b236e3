"""The training input loader: a prepared dataset (data/prepared.py) -> padded batches.

Letters: B prompts (b on one host), R responses per prompt, T tokens.

`train_batches` reads the dataset per host (`tfds.split_for_jax_process`), shuffled by (seed,
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
from typing import Callable, Iterator, Sequence

import numpy as np

from data.prepared import SPLIT, open_prepared, prompt_lengths
from data.problems import InputError

SHUFFLE_BUFFER = 4096

log = logging.getLogger(__name__)


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
  """Indices of at most r responses, spread over the score order (best and worst kept),
  ascending."""
  n = len(scores)
  if n <= r:
    return np.arange(n)
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")  # best first
  return np.sort(order[np.linspace(0, n - 1, r).round().astype(int)])


def padding_fraction(batch: dict) -> float:
  """The share of [b, R, T] positions that are padding."""
  seg = batch["segment_ids"]
  return 1.0 - float(np.sum(seg)) / seg.size


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
  task_id: str


class TrainBatches:
  """The iterator `train_batches` returns; also says how many batches an epoch has.

  batches_per_epoch: every host's batches per epoch (the least over hosts).
  examples: this host's prompts per epoch; long_prompts: those skipped (prompt >= seq_len).
  buckets: the batch lengths T it may use.
  parts: the data parts (of `splits`) this host reads; task_ids_read: the task ids of the
  prompts in the batches it has yielded so far (what `rrtf train` records per host).
  """

  def __init__(
    self,
    data_dir: str,
    *,
    start: DataState | None = None,
    batch_size: int,
    pad_id: int,
    process_index: int | None,
    process_count: int | None,
    splits: int | None,
    agree_length: Callable[[int], int] | None,
    **kw,
  ):
    start = start or DataState()
    if start.epoch < 0 or start.batch < 0:
      raise ValueError(f"start must not be negative, got {start}")
    if process_index is None or process_count is None:
      import jax

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(
        f"process_index {process_index} is not in [0, process_count {process_count})"
      )
    splits = splits or process_count
    if splits % process_count:
      raise ValueError(f"data splits {splits} do not divide over {process_count} processes")
    k = splits // process_count
    if batch_size < 1 or batch_size % k:
      raise ValueError(
        f"a host's batch of {batch_size} prompts does not split over its {k} data parts"
      )
    self.parts = list(range(process_index * k, (process_index + 1) * k))
    self.task_ids_read: set[str] = set()
    readers = [
      _Reader(
        data_dir,
        batch_size=batch_size // k,
        pad_id=pad_id,
        process_index=part,
        process_count=splits,
        seen=self.task_ids_read,
        **kw,
      )
      for part in self.parts
    ]
    # the same for every part: the least of all
    self.batches_per_epoch = readers[0].batches_per_epoch
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


def _merged(
  gens: list, agree_length: Callable[[int], int] | None, pad_id: int
) -> Iterator[tuple[dict, DataState]]:
  """The parts' batches side by side, padded to one length T: the longest part's bucket, or the
  longer length every host agrees on (`agree_length`)."""
  for items in zip(*gens):
    batches = [b for b, _ in items]
    t = max(b["inputs"].shape[-1] for b in batches)
    if agree_length is not None:
      agreed = int(agree_length(t))
      if agreed < t:
        raise ValueError(
          f"agree_length returned {agreed}, shorter than this host's batch length {t}"
        )
      t = agreed
    out = {}
    for name in batches[0]:
      fill = pad_id if name in _PAD_WITH_ID else 0
      arrays = [
        b[name]
        if b[name].ndim == 2
        # [b, R, T] token fields; scores, is_teacher are [b, R]
        else np.pad(b[name], ((0, 0), (0, 0), (0, t - b[name].shape[-1])), constant_values=fill)
        for b in batches
      ]
      out[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    yield out, items[0][1]


class _Reader:
  """A host's view of a prepared dataset: epochs in (seed, epoch) order, cut into batches."""

  def __init__(
    self,
    data_dir: str,
    *,
    batch_size: int,
    responses: int,
    seq_len: int,
    pad_id: int,
    seed: int,
    buckets: Sequence[int] | None,
    window: int,
    process_index: int,
    process_count: int,
    shuffle_buffer: int,
    seen: set[str],
  ):
    import tensorflow_datasets as tfds

    for name, v in (
      ("batch_size", batch_size),
      ("responses", responses),
      ("seq_len", seq_len),
      ("window", window),
      ("shuffle_buffer", shuffle_buffer),
    ):
      if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    self.data_dir, self.b, self.r, self.seq_len, self.pad_id = (
      data_dir,
      batch_size,
      responses,
      seq_len,
      int(pad_id),
    )
    self.seed, self.window, self.shuffle_buffer, self.seen = seed, window, shuffle_buffer, seen
    self.buckets = sorted(
      {int(t) for t in (buckets or default_buckets(seq_len)) if 0 < t < seq_len} | {seq_len}
    )
    self.builder = open_prepared(data_dir)
    splits = [
      tfds.split_for_jax_process(
        SPLIT, process_index=p, process_count=process_count, drop_remainder=True
      )
      for p in range(process_count)
    ]
    self.split = splits[process_index]
    total = int(self.builder.info.splits[SPLIT].num_examples)
    per_host = total // process_count
    # Prompts of seq_len tokens or more leave no room for a response: they are skipped. Every
    # host must step the same number of batches per epoch, so count them on every host's split
    # (only when the metadata does not rule them out).
    longest = (
      self.builder.info.metadata.get("max_prompt_length") if self.builder.info.metadata else None
    )
    self.filter = longest is None or int(longest) >= seq_len
    kept = self._count_fitting(splits) if self.filter else [per_host] * process_count
    self.examples = per_host
    self.long_prompts = per_host - kept[process_index]
    self.batches_per_epoch = min(kept) // batch_size
    if self.long_prompts:
      log.warning(
        "%s: skipping %d of %d prompts on this host with >= seq_len %d tokens",
        data_dir,
        self.long_prompts,
        per_host,
        seq_len,
      )
    if self.batches_per_epoch == 0:
      raise InputError(
        f"{data_dir}: not one batch per host: {total} prompts over {process_count} hosts, at least "
        f"{min(kept)} with prompts shorter than seq_len {seq_len} on each, batch_size {batch_size}"
      )

  def _count_fitting(self, splits) -> list[int]:
    """Per host split: prompts shorter than seq_len. One pass over the prompt lengths of all
    files."""
    files = [fi for fi in self.builder.info.splits[SPLIT].file_instructions if fi.take]
    offset = dict(zip([fi.filename for fi in files], np.cumsum([0] + [fi.take for fi in files])))
    fits = np.concatenate(
      [[0], np.cumsum(prompt_lengths([fi.filename for fi in files]) < self.seq_len)]
    )
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
    ds = self.builder.as_dataset(
      split=self.split,
      shuffle_files=True,
      read_config=tfds.ReadConfig(shuffle_seed=s, options=options, try_autocache=False),
    )
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
      resp = tokens[starts[j] : starts[j] + lengths[j]]
      seqs[i] = np.concatenate([tokens[:p], resp])[: self.seq_len + 1].astype(np.int32)
      scores[i], teacher[i] = ex["scores"][j], bool(ex["is_teacher"][j])
    length = max((len(s) for s in seqs if s is not None), default=0)
    return _Example(seqs, p, scores, teacher, length, ex["task_id"].decode())

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
        loss_mask[i, j, max(e.prompt_length - 1, 0) : n] = 1.0  # targets that are response tokens
    return {
      "inputs": inputs,
      "targets": targets,
      "loss_mask": loss_mask,
      "segment_ids": segment_ids,
      "scores": np.stack([e.scores for e in exs]),
      "is_teacher": np.stack([e.is_teacher for e in exs]),
    }

  def _epoch(self, epoch: int, skip_batches: int) -> Iterator[tuple[dict, DataState]]:
    b, w, n = self.b, self.window, self.batches_per_epoch
    first = skip_batches // w  # whole windows to skip
    it = self._dataset(epoch, first * w * b).as_numpy_iterator()
    for wi in itertools.count(first):
      raw = list(itertools.islice(it, w * b))
      full = len(raw) // b  # a final partial window keeps its full batches only
      if full == 0 or wi * w >= n:
        return
      exs = [self._example(ex) for ex in raw[: full * b]]
      order = sorted(range(len(exs)), key=lambda k: exs[k].length)  # stable
      batches = [order[k * b : (k + 1) * b] for k in range(full)]
      perm = np.random.default_rng((self.seed, epoch, wi)).permutation(full)
      for k, bi in enumerate(perm):
        index = wi * w + k
        if index >= n:  # hosts with more data stop with the one with the least
          return
        if index < skip_batches:
          continue
        rows = [exs[m] for m in batches[bi]]
        # Read means handed out: rows skipped on resume, dropped or never reached are not.
        self.seen.update(e.task_id for e in rows)
        yield self._batch(rows), DataState(epoch, index + 1)

  def generate(self, start: DataState) -> Iterator[tuple[dict, DataState]]:
    epoch, k = start.epoch, start.batch
    while True:
      if k < self.batches_per_epoch:  # the state after an epoch's last batch starts the next one
        yield from self._epoch(epoch, k)
      epoch, k = epoch + 1, 0


def train_batches(
  data_dir: str,
  *,
  batch_size: int,
  responses: int,
  seq_len: int,
  pad_id: int,
  seed: int = 0,
  start: DataState | None = None,
  buckets: Sequence[int] | None = None,
  window: int = 8,
  process_index: int | None = None,
  process_count: int | None = None,
  splits: int | None = None,
  agree_length: Callable[[int], int] | None = None,
  shuffle_buffer: int = SHUFFLE_BUFFER,
) -> TrainBatches:
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
  return TrainBatches(
    data_dir,
    batch_size=batch_size,
    responses=responses,
    seq_len=seq_len,
    pad_id=pad_id,
    seed=seed,
    start=start,
    buckets=buckets,
    window=window,
    process_index=process_index,
    process_count=process_count,
    splits=splits,
    agree_length=agree_length,
    shuffle_buffer=shuffle_buffer,
  )
