"""`rrtf demo` at its default sizes for several seeds: base vs RRTF vs the ablation, held out.

A benchmark, never pass/fail. For each seed it runs `rrtf demo --seed S --ablation` as a user
would (a fresh process, its own workdir under --workdir), then reads the demo's summary.json
and stage timings. Recorded per seed: greedy pass@1, sampled pass@k and held-out ranking
accuracy of base, RRTF and ablation; the seconds of each stage; and the wall time of the
default demo (every stage but the ablation's three). Then whether RRTF beats the base
model's greedy pass@1 on every seed, and how it compares with the ablation.

The JAX compilation cache is a fresh directory per benchmark run shared by the seeds (the
first seed compiles, the others mostly reuse), so `first seed` and `other seeds` timings are
both reported; a user's first `rrtf demo` is the cold case.

Run from the repo root (the wall time of each run is in results/demo.json):
  python benchmarks/demo.py                       # seeds 0 1 2
  python benchmarks/demo.py --seeds 0 --quick     # smoke run
  python benchmarks/demo.py --report-only         # rewrite demo.md from demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import results_io  # noqa: E402

ABLATION_STAGES = ("train_ablation", "eval_ablation", "accuracy_ablation")
MODELS = ("base", "rrtf", "ablation")


def run_seed(seed: int, workdir: str, quick: bool, cache: str) -> dict:
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  cmd = ["rrtf", "demo", "--seed", str(seed), "--ablation", "--quiet", "--workdir", workdir] + (
    ["--quick"] if quick else []
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache)
  t0 = time.perf_counter()
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if out.returncode:
    raise SystemExit(
      f"seed {seed}: rrtf demo failed "
      f"({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    )
  print(out.stdout, flush=True)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  stages = {}
  for name in sorted(os.listdir(os.path.join(workdir, "stages"))):
    with open(os.path.join(workdir, "stages", name)) as f:
      stages[name[: -len(".json")]] = json.load(f)
  seconds = {k: v["seconds"] for k, v in stages.items()}
  ablation_share = sum(seconds[k] for k in ABLATION_STAGES)
  row = {
    "seed": seed,
    "wall_s": round(wall, 1),
    "stage_s": seconds,
    "default_demo_s": round(wall - ablation_share, 1),
  }
  for m in MODELS:
    r = summary[m]
    row[m] = {
      "pass@1": r["pass@1"],
      "pass@1_ci95": r["pass@1_ci95"],
      "pass@k": r["pass@k"],
      "pass@k_ci95": r["pass@k_ci95"],
      "new_template": r["new_template"],
      "ranking_accuracy": r["ranking_accuracy"],
    }
  row["settings"] = {m: summary[m]["settings"] for m in MODELS}
  row["paired"] = {k: summary["paired"][k] for k in ("rrtf vs base", "rrtf vs ablation")}
  return row


def markdown(result: dict) -> str:
  rows = result["seeds"]
  ks = list(rows[0]["base"]["pass@k"])
  lines = [
    f"# rrtf demo{' --quick' if result['quick'] else ''}: base vs RRTF vs ablation, held-out",
    "",
    f"{result['machine']}; {result['date']}. Greedy pass@1 and sampled pass@k "
    f"(n={rows[0]['settings']['base']['evaluation']['n']}) on "
    f"{rows[0]['settings']['base']['evaluation']['problems']} held-out problems per seed.",
    "",
    "In brackets: 95% bootstrap intervals over problems. new: the new-template split "
    "(templates no training split has; absent from runs before it existed).",
    "",
    "| seed | model | pass@1 (greedy) | "
    + " | ".join(ks)
    + " | new: pass@1 (greedy) | new: pass@1 | ranking accuracy |",
    "|---|---|---|" + "---|" * len(ks) + "---|---|---|",
  ]

  def cell(value, ci=None):
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

  for r in rows:
    for m in MODELS:
      v, new = r[m], r[m].get("new_template")
      newcells = (
        [cell(new["pass@1"], new["pass@1_ci95"])]
        + [cell(new["pass@k"]["pass@1"], new["pass@k_ci95"]["pass@1"])]
        if new
        else ["-", "-"]
      )
      lines.append(
        f"| {r['seed']} | {m} | {cell(v['pass@1'], v.get('pass@1_ci95'))} | "
        + " | ".join(cell(v["pass@k"][k], v.get("pass@k_ci95", {}).get(k)) for k in ks)
        + " | "
        + " | ".join(newcells)
        + f" | {v['ranking_accuracy']:.3f} |"
      )
  if all("paired" in r for r in rows):
    lines += ["", "Paired tests (greedy pass@1, in-template; exact sign test):", ""]
    for r in rows:
      for label, tests in r["paired"].items():
        t = tests["heldout/greedy"]
        lines.append(
          f"- seed {r['seed']}, {label}: {t['difference']:+.3f} "
          f"[{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}], better on {t['a_better']} vs "
          f"{t['b_better']} problems, p = {t['p_value']:.2g}"
        )
  lines += [
    "",
    "- RRTF beats the base model (greedy pass@1) on every seed: "
    f"**{result['rrtf_beats_base_every_seed']}**",
    f"- RRTF vs ablation (greedy pass@1), per seed: {result['rrtf_minus_ablation']}",
    "- mean greedy pass@1: " + ", ".join(f"{m} {result['mean_pass@1'][m]:.3f}" for m in MODELS),
    "",
    "| seed | default demo wall s (no ablation) | with --ablation | compilation cache |",
    "|---|---|---|---|",
  ]
  for i, r in enumerate(rows):
    lines.append(
      f"| {r['seed']} | {r['default_demo_s']:.0f} | {r['wall_s']:.0f} | "
      f"{'cold' if i == 0 else 'warm'} |"
    )
  lines += [
    "",
    "Stage seconds of the first seed: "
    + ", ".join(f"{k} {v:.0f}" for k, v in rows[0]["stage_s"].items()),
    "",
  ]
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rrtf-demo-bench"))
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "demo.json"))
  ap.add_argument("--report-only", action="store_true")
  args = ap.parse_args()
  if args.report_only:
    return results_io.rewrite_markdown(args.out, markdown)
  cache = os.path.join(args.workdir, "jax-cache")
  shutil.rmtree(cache, ignore_errors=True)
  rows = [
    run_seed(s, os.path.join(args.workdir, f"seed{s}"), args.quick, cache) for s in args.seeds
  ]
  result = {
    "machine": f"{os.cpu_count()} CPUs, JAX_PLATFORMS=cpu",
    "date": time.strftime("%Y-%m-%d"),
    "quick": args.quick,
    "seeds": rows,
    "rrtf_beats_base_every_seed": all(r["rrtf"]["pass@1"] > r["base"]["pass@1"] for r in rows),
    "rrtf_minus_ablation": {
      r["seed"]: round(r["rrtf"]["pass@1"] - r["ablation"]["pass@1"], 4) for r in rows
    },
    "mean_pass@1": {m: sum(r[m]["pass@1"] for r in rows) / len(rows) for m in MODELS},
  }
  results_io.write(args.out, result, markdown)


if __name__ == "__main__":
  main()
