"""Ranking: execute every response's code in the sandbox, score it, keep useful problems.

Scores (higher is better; PanGu-Coder2's four classes, a teacher above a student within
a class, and within "some tests pass" ordered by the fraction of tests passed):
  syntax error            0      teacher 0.5
  runtime error/timeout   1      teacher 1.5   (failed to load, died, hung, or raised
                                               and passed no test)
  some tests pass         2 + 0.49 f   teacher 2.5 + 0.49 f   (f = passed / total < 1)
  all tests pass          3      teacher 3.5
So the class decides first, the source second, the fraction third, and score gaps stay
meaningful for the paper's pair weights (r_j - r_i). A problem whose best teacher
response scores below the best student response is dropped (as in the paper) unless
`keep_student_wins`.

`rank_stage` turns the samples TFRecords (data/records.py) into a TFDS dataset: one
output shard per input file, written to a temporary name and renamed when complete, so a
rerun skips finished shards and a killed run leaves nothing partial; with
`shard/num_shards`, process i takes input files i, i+n, ...; TFDS metadata is written once
every shard exists. Paths are local or URLs (gs://; data/records.py says how).
"""

from __future__ import annotations

import collections
import dataclasses
import os

from data import records
from data.problems import InputError

CLASS = {"syntax_error": 0, "runtime_error": 1, "timeout": 1, "wrong_answer": 2, "passed": 3}


def score(outcome: str, tests_passed: int, tests_total: int, is_teacher: bool) -> float:
  level = CLASS[outcome]
  s = level + 0.5 * bool(is_teacher)
  if level == 2 and tests_total > 0:
    s += 0.49 * tests_passed / tests_total
  return s


def keep(scores: list[float], is_teacher: list[int], keep_student_wins: bool = False) -> bool:
  """Whether a problem's responses make a useful ranking example."""
  if not scores:
    return False
  teacher = [s for s, t in zip(scores, is_teacher) if t]
  student = [s for s, t in zip(scores, is_teacher) if not t]
  return not (teacher and student and max(teacher) < max(student) and not keep_student_wins)


@dataclasses.dataclass
class RankSummary:
  shards_done: list[int] = dataclasses.field(default_factory=list)
  shards_skipped: list[int] = dataclasses.field(default_factory=list)
  problems: int = 0
  kept: int = 0
  responses: int = 0
  outcomes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  metadata_written: bool = False

  def report(self) -> str:
    lines = [
      f"ranked {self.responses} responses of {self.problems} problems in shards "
      f"{self.shards_done or '-'} (skipped, already done: {self.shards_skipped or '-'})",
      f"kept {self.kept} problems; dropped {self.problems - self.kept} "
      "where a student beat every teacher",
      "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
    ]
    lines.append(
      "TFDS metadata written"
      if self.metadata_written
      else "TFDS metadata not written yet: other shards are missing"
    )
    return "\n".join(lines)


def input_files(samples_dir: str) -> list[str]:
  if not records.isdir(samples_dir):
    raise InputError(f"{samples_dir}: no such directory")
  names = sorted(
    n for n in records.listdir(samples_dir) if ".tfrecord" in n and not n.startswith(".tmp-")
  )
  if not names:
    raise InputError(f"{samples_dir}: no samples TFRecords (*.tfrecord*)")
  return [os.path.join(samples_dir, n) for n in names]


def rank_records(recs: list[dict], box, *, keep_student_wins: bool = False, on_done=None):
  """Yields (ranked record, kept) for each samples record, executing all codes in `box`."""
  from rrtf_jax.sandbox import Job

  jobs = [
    Job(r["exec_prefix"] + code, r["test"], r["entry_point"], prefix=r["exec_prefix"])
    for r in recs
    for code in r["codes"]
  ]
  verdicts = iter(box.map(jobs, on_done=on_done))
  for r in recs:
    vs = [next(verdicts) for _ in r["codes"]]
    out = dict(
      r,
      outcomes=[v.outcome for v in vs],
      tests_passed=[v.tests_passed for v in vs],
      tests_total=[v.tests_total for v in vs],
    )
    out["scores"] = [
      score(v.outcome, v.tests_passed, v.tests_total, t) for v, t in zip(vs, r["is_teacher"])
    ]
    yield out, keep(out["scores"], r["is_teacher"], keep_student_wins)


def rank_stage(
  samples_dir: str,
  out_dir: str,
  *,
  shard: int = 0,
  num_shards: int = 1,
  workers: int | None = None,
  timeout: float = 3.0,
  keep_student_wins: bool = False,
  progress: bool = True,
) -> RankSummary:
  import tensorflow as tf
  from tqdm import tqdm

  from rrtf_jax.sandbox import Limits, Sandbox

  records.check_shard(shard, num_shards)
  inputs = input_files(samples_dir)
  outputs = [
    os.path.join(out_dir, records.shard_name(records.RANKED_NAME, "train", j, len(inputs)))
    for j in range(len(inputs))
  ]
  summary = RankSummary()
  todo, summary.shards_skipped = records.shard_plan(outputs, shard, num_shards)
  # Read and check every input before executing anything: bad input fails fast, writes nothing.
  loaded = {}
  for j in todo:
    try:
      recs = list(records.read(inputs[j]))
    except tf.errors.OpError as e:
      raise InputError(
        f"{inputs[j]}: not a readable TFRecord file ({e.message.splitlines()[0]})"
      ) from None
    for i, r in enumerate(recs):
      records.validate(r, ranked=False, where=f"{inputs[j]}: record {i}")
    loaded[j] = recs
  if todo:
    records.makedirs(out_dir)
    with Sandbox(workers, Limits(timeout=timeout)) as box:
      for j in todo:
        recs = loaded.pop(j)
        total = sum(len(r["codes"]) for r in recs)
        with tqdm(
          total=total,
          desc=f"rank shard {j + 1}/{len(inputs)}",
          unit="sample",
          disable=not progress,
          dynamic_ncols=True,
        ) as bar:
          ranked = list(
            rank_records(
              recs, box, keep_student_wins=keep_student_wins, on_done=lambda: bar.update(1)
            )
          )
        for r, kept in ranked:
          summary.problems += 1
          summary.kept += kept
          summary.responses += len(r["codes"])
          summary.outcomes.update(r["outcomes"])
        records.write_atomic(outputs[j], (r for r, kept in ranked if kept), ranked=True)
        summary.shards_done.append(j)
  if all(records.exists(p) for p in outputs):
    records.write_ranked_metadata(out_dir)
    summary.metadata_written = True
  return summary
