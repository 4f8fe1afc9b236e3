"""`rrtf prepare`: a ranked TFDS dataset (`rrtf rank`) -> the prepared TFDS dataset of token
ids that `rrtf train` reads (format: data/prepared.py).

Like `rank_stage` it writes one output shard per input shard under a temporary name, skips
finished shards on a rerun, splits input files i, i+n, ... over `--shard i --num-shards n`,
and writes the TFDS metadata (with the longest prompt) once every shard exists. Its paths
may be local or gs:// (fsspec/gcsfs, through the helpers of data/records.py).
"""

from __future__ import annotations

import dataclasses
import math
import os

from data import records
from data.prepared import (
  PREPARED_NAME,
  SPLIT,
  features,
  prepare_record,
  write_atomic,
  write_metadata,
)
from data.problems import InputError
from data.tokenizer import resolve_tokenizer


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
    lines = [
      f"prepared {self.problems} problems ({self.responses} responses, {self.tokens} tokens) "
      "in shards "
      f"{self.shards_done or '-'} (skipped, already done: {self.shards_skipped or '-'})"
    ]
    if self.empty:
      lines.append(f"left out {self.empty} problems without responses")
    lines.append(
      "TFDS metadata written"
      if self.metadata_written
      else "TFDS metadata not written yet: other shards are missing"
    )
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
    raise InputError(
      f"{ranked_dir}: {len(names)} ranked shards with mismatched or missing numbers; "
      f"finish every `rrtf rank` shard first"
    )
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
        raise InputError(
          f"{where} ({r['task_id']}): is_teacher must be 0 or 1, got {r['is_teacher']}"
        )
      n += 1
  except tf.errors.OpError as e:
    raise InputError(
      f"{path}: not a readable TFRecord file ({e.message.splitlines()[0]})"
    ) from None
  except DecodeError:
    raise InputError(f"{path}: record {n} is not a tf.train.Example") from None
  return n


def prepare_stage(
  ranked_dir: str,
  out_dir: str,
  tokenizer,
  *,
  shard: int = 0,
  num_shards: int = 1,
  progress: bool = True,
) -> PrepareSummary:
  """`rrtf prepare`: ranked TFDS dataset -> prepared TFDS dataset `out_dir` (PREPARED_NAME);
  both local or URLs (gs://, through fsspec: data/records.py)."""
  from tqdm import tqdm

  records.check_shard(shard, num_shards)
  inputs = ranked_files(ranked_dir)
  outputs = [
    os.path.join(out_dir, records.shard_name(PREPARED_NAME, SPLIT, j, len(inputs)))
    for j in range(len(inputs))
  ]
  summary = PrepareSummary()
  todo, summary.shards_skipped = records.shard_plan(outputs, shard, num_shards)
  # Check every input before writing anything: bad input fails fast and writes nothing.
  sizes = {j: _check_ranked(inputs[j]) for j in todo}
  if todo:
    tok = resolve_tokenizer(tokenizer)
    if tok.eos_id is None:
      raise InputError(f"{getattr(tok, 'path', tokenizer)}: the tokenizer has no EOS token")
    records.makedirs(out_dir)
    feats = features(encoder=True)
    for j in todo:
      with tqdm(
        total=sizes[j],
        desc=f"prepare shard {j + 1}/{len(inputs)}",
        unit="problem",
        disable=not progress,
        dynamic_ncols=True,
      ) as bar:

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
