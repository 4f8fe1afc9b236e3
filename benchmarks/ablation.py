"""Does ranking help? The RRTF loss variants against SFT on the best response, on the demo family.

A benchmark, never pass/fail. Per seed (its own workdir, a fresh process per phase, the stages
of `rrtf demo` with their resume markers), from the same base model and the same ranked samples:

  base       the warm-up model (`rrtf demo`'s base)
  sft        SFT on the best response only: rank_weight 0 (`rrtf demo --ablation`)
  paper      RRTF as PanGu-Coder2: hinge ranking loss with gap weights + summed cross-entropy
  mean       the paper's loss with the cross-entropy a per-token mean (ft_normalization mean)
  logistic   the paper's loss with SimPO's length-normalised Bradley-Terry pair loss
             (pair_loss logistic, beta 2, gamma 0.5) instead of the hinge
  <best>_x2, <best>_x2_r2
             two on-policy rounds of the best of the four trained arms (highest sampled
             in-template pass@1, pooled over the seeds, chosen after phase 1): round 1 trains
             from the base on the shared samples, round 2 samples the round-1 model, ranks and
             trains from it; each round gets half the steps, so the training budget equals
             the other arms' (the extra sampling is not counted)

Every trained arm has the same steps, batch, learning rate and data. Each model is evaluated
on the demo's held-out split (in-template: the training templates, new instances) and its
new-template split (templates no training split has): greedy pass@1 and sampled pass@1
(n=10). Per arm: the mean over problems pooled across the seeds with its 95% bootstrap
interval (problems of different seeds are different problems), the per-seed figures, and
paired tests on the same problems (paired bootstrap interval of the difference, exact sign
test) of each arm against sft, the paper and the base, and of round 2 against the best arm.

  python benchmarks/ablation.py                     # seeds 0 1 2, about 45 minutes on 2 cores
  python benchmarks/ablation.py --seeds 0 --quick   # smoke run, a few minutes
  python benchmarks/ablation.py --report-only       # rewrite ablation.md/png from ablation.json
Writes benchmarks/results/ablation.{json,md,png}. A killed run resumes from --workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import results_io  # noqa: E402

ARMS = {
  "sft": {"rank_weight": 0.0},
  "paper": {},
  "mean": {"ft_normalization": "mean"},
  "logistic": {"pair_loss": "logistic", "beta": 2.0, "gamma": 0.5},
}
STEPS = 100  # per trained arm (the rounds arm: 50 + 50); the default demo trains 250
QUICK_STEPS = 4
FIGURES = {
  "heldout/greedy": "in-template greedy pass@1",
  "heldout/sampled": "in-template sampled pass@1",
  "heldout_new/greedy": "new-template greedy pass@1",
  "heldout_new/sampled": "new-template sampled pass@1",
}


def _sizes(quick: bool):
  from rrtf_jax import demo

  base = demo.QUICK if quick else demo.DEFAULT
  return dataclasses.replace(base, rrtf_steps=QUICK_STEPS if quick else STEPS)


def worker(workdir: str, seed: int, quick: bool, best: str | None) -> None:
  """One seed in this process: phase 1 (best None) trains the four arms; phase 2 the two
  on-policy rounds of `best`, then the summary of every model (demo.finish)."""
  from rrtf_jax import demo

  sizes = _sizes(quick)
  d = demo.open_demo(workdir, seed, sizes, progress=False, total=None)
  demo.prepare_base(d)
  models = ["base"]
  for arm, loss in ARMS.items():
    models += demo.train_arm(d, arm, loss=loss)
  if best is not None:
    models += demo.train_arm(
      d, f"{best}_x2", loss=ARMS[best], rounds=2, steps=max(1, sizes.rrtf_steps // 2)
    )
    demo.finish(d, models)


def _run_worker(workdir: str, seed: int, quick: bool, best: str | None, cache: str) -> float:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed)]
  cmd += (
    ["--workdir", workdir] + (["--quick"] if quick else []) + (["--best", best] if best else [])
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache)
  t0 = time.perf_counter()
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  if out.returncode:
    raise SystemExit(
      f"seed {seed}: worker failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
  print("\n".join(line for line in out.stdout.splitlines() if line.startswith("[demo]")))
  return time.perf_counter() - t0


def analyse(workdirs: dict[int, str], models: list[str], comparisons: list[tuple[str, str]]):
  """Pooled means with intervals, per-seed figures and paired tests over seed x problem."""
  from rrtf_jax.demo import per_problem
  from rrtf_jax.stats import bootstrap_mean, paired_difference

  pooled, per_seed, paired = {}, {}, {}
  for figure in FIGURES:
    split, mode = figure.split("/")
    values = {}  # model -> "seed:task_id" -> pass@1 estimate
    for m in models:
      values[m] = {}
      for s, w in workdirs.items():
        seed_values = per_problem(w, m, split, mode)
        per_seed.setdefault(m, {}).setdefault(figure, {})[s] = sum(seed_values.values()) / len(
          seed_values
        )
        values[m].update({f"{s}:{t}": v for t, v in seed_values.items()})
      ids = sorted(values[m])
      pooled.setdefault(m, {})[figure] = bootstrap_mean([values[m][i] for i in ids])
    for a, b in comparisons:
      ids = sorted(values[a])
      paired.setdefault(f"{a} vs {b}", {})[figure] = paired_difference(
        [values[a][i] for i in ids], [values[b][i] for i in ids]
      )
  return pooled, per_seed, paired


def markdown(result: dict) -> str:
  from rrtf_jax import demo

  models = result["models"]
  lines = [
    "# Does ranking help? RRTF loss variants vs SFT on the best response (demo family)",
    "",
    f"{result['machine']}; {result['date']}; seeds {result['seeds']}; "
    f"{result['steps']} steps per trained arm (batch {result['sizes']['batch']} prompts x "
    f"{result['sizes']['responses']} responses, lr {result['sizes']['rrtf_lr']}); held-out "
    f"{result['sizes']['heldout']} in-template + {result['sizes']['heldout_new']} new-template "
    f"problems per seed; sampled pass@1 from n={result['sizes']['eval_n']} at temperature "
    f"{result['sizes']['eval_temperature']}. Wall time {result['wall_s'] / 60:.1f} min.",
    "",
    "Pooled over seeds (each seed's problems are different problems), 95% bootstrap interval:",
    "",
    "| model | " + " | ".join(FIGURES.values()) + " |",
    "|---" * (len(FIGURES) + 1) + "|",
  ]
  for m in models:
    cells = []
    for fig in FIGURES:
      p = result["pooled"][m][fig]
      cells.append(f"{p['mean']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines += ["", "Per seed:", "", "| model | " + " | ".join(FIGURES.values()) + " |"]
  lines.append("|---" * (len(FIGURES) + 1) + "|")
  for m in models:
    cells = [" / ".join(f"{v:.3f}" for v in result["per_seed"][m][fig].values()) for fig in FIGURES]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "Paired tests on the same problems (first minus second): difference, 95% paired bootstrap "
    "interval, problems where each is better, exact sign test p. Significant: p < 0.05 and "
    "the interval excludes 0.",
    "",
    "| comparison | figure | difference | 95% interval | better on | p | verdict |",
    "|---|---|---|---|---|---|---|",
  ]
  for label, tests in result["paired"].items():
    for fig, t in tests.items():
      lines.append(
        f"| {label} | {FIGURES[fig]} | {t['difference']:+.3f} | "
        f"[{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] | {t['a_better']} vs {t['b_better']} | "
        f"{t['p_value']:.2g} | {demo.significance(t)} |"
      )
  lines += [
    "",
    f"Best arm after phase 1 (sampled in-template pass@1, pooled): **{result['best']}**; its "
    f"two on-policy rounds are `{result['best']}_x2` (round 1, {result['steps'] // 2} steps) "
    f"and `{result['best']}_x2_r2` (round 2, {result['steps'] // 2} more).",
    "",
    "Seconds per seed: "
    + ", ".join(f"seed {s}: {v:.0f}" for s, v in result["seconds_per_seed"].items()),
    "",
  ]
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models, figures = result["models"], list(FIGURES)
  fig, ax = plt.subplots(figsize=(2.0 + 1.2 * len(models), 3.8))
  width = 0.8 / len(figures)
  for i, f in enumerate(figures):
    xs = [j + i * width for j in range(len(models))]
    means = [result["pooled"][m][f]["mean"] for m in models]
    err = [
      [means[j] - result["pooled"][m][f]["ci95"][0] for j, m in enumerate(models)],
      [result["pooled"][m][f]["ci95"][1] - means[j] for j, m in enumerate(models)],
    ]
    ax.bar(xs, means, width, yerr=err, capsize=2, label=FIGURES[f])
    for j, m in enumerate(models):
      seeds = list(result["per_seed"][m][f].values())
      ax.plot([xs[j]] * len(seeds), seeds, "k.", markersize=3)
  ax.set_xticks([j + width * (len(figures) - 1) / 2 for j in range(len(models))], models)
  ax.set_ylabel("pass@1 (pooled, 95% interval; dots: seeds)", fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, format="png", dpi=100)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "rrtf-ablation"))
  ap.add_argument(
    "--out", default=os.path.join(os.path.dirname(__file__), "results", "ablation.json")
  )
  ap.add_argument("--report-only", action="store_true")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--best", help=argparse.SUPPRESS)
  args = ap.parse_args()
  png = os.path.splitext(args.out)[0] + ".png"
  if args.worker:
    return worker(args.workdir, args.seed, args.quick, args.best)
  if args.report_only:
    with open(args.out) as f:
      plot(json.load(f), png)
    return results_io.rewrite_markdown(args.out, markdown)

  cache = os.path.join(args.workdir, "jax-cache")
  workdirs = {s: os.path.join(args.workdir, f"seed{s}") for s in args.seeds}
  t0 = time.perf_counter()
  seconds = {s: _run_worker(w, s, args.quick, None, cache) for s, w in workdirs.items()}
  arms = list(ARMS)
  pooled, _, _ = analyse(workdirs, arms, [])
  best = max(arms, key=lambda a: pooled[a]["heldout/sampled"]["mean"])
  print(f"best arm after phase 1: {best}", flush=True)
  for s, w in workdirs.items():
    seconds[s] += _run_worker(w, s, args.quick, best, cache)
  models = ["base", *arms, f"{best}_x2", f"{best}_x2_r2"]
  comparisons = [(a, "sft") for a in arms if a != "sft"]
  comparisons += [(a, "paper") for a in ("mean", "logistic")]
  comparisons += [(a, "base") for a in arms]
  comparisons += [(f"{best}_x2_r2", best), (f"{best}_x2_r2", f"{best}_x2")]
  pooled, per_seed, paired = analyse(workdirs, models, comparisons)
  sizes = dataclasses.asdict(_sizes(args.quick))
  result = {
    "machine": f"{os.cpu_count()} CPUs, JAX_PLATFORMS=cpu",
    "date": time.strftime("%Y-%m-%d"),
    "quick": args.quick,
    "seeds": args.seeds,
    "steps": sizes["rrtf_steps"],
    "sizes": sizes,
    "arms": ARMS,
    "best": best,
    "models": models,
    "pooled": pooled,
    "per_seed": per_seed,
    "paired": paired,
    "seconds_per_seed": {s: round(v, 1) for s, v in seconds.items()},
    "wall_s": round(time.perf_counter() - t0, 1),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  plot(result, png)
  results_io.write(args.out, result, markdown)


if __name__ == "__main__":
  main()
