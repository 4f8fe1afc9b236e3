"""In-depth Evol-Instruct for code: a teacher makes seed problems harder, solves them and
writes their tests; only problems whose solution passes its own tests in the sandbox stay.

Each round (round 1 evolves the seeds, round k the problems kept in round k-1):
  evolve    one teacher request per problem: rewrite it a little harder by one of
            METHODS, picked by hashing (global seed, seed index, round)
  decontam  drop a statement sharing any word n-gram with a HumanEval prompt
  solve     one teacher request per survivor: a ```python solution, a ```python block
            with `def check(candidate):` asserts, an `Entry point: <name>` line
  validate  the solution against its tests in the sandbox; keep outcome "passed"
Each request carries a seed derived from (global seed, seed index, round, step) and goes
through the client's disk cache, so a rerun asks the teacher nothing and writes the same
file. The output (written once, atomically, at the end) is the instruction format that
`rrtf sample` reads, one line per kept problem of every round:
  {"task_id": "evol/<seed index>/r<round>", "instruction", "test", "entry_point",
   "solution", "method", "round", "parent": seed index (round 1) or parent's task_id}
`<out>.report.json` counts every round's drops, with the reason for each.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import hashlib
import re

from data.problems import PROBLEM_FIELDS, InputError, load_problems, read_jsonl, write_jsonl_atomic

# In-depth evolving, one way of making a problem harder each (our own wording).
METHODS = {
  "constraint": "Add one new constraint or requirement that a solution must also satisfy.",
  "specific": "Replace a requirement that is common in exercises like this one with a rarer, "
  "more specific requirement.",
  "reasoning": "Change the exercise so that solving it takes several more steps of reasoning "
  "than before, not just more code.",
  "complexity": "Require a stricter bound on running time or memory than a straightforward "
  "solution meets, and state the bound explicitly.",
  "misleading_code": "Include a short piece of Python code that looks like a solution but has a "
  "subtle bug, presented as a flawed reference attempt, to misdirect.",
}

EVOLVE_PROMPT = """\
You are making programming exercises harder, one careful step at a time.
Rewrite the exercise below so that it becomes somewhat more difficult, in this way:
{method}
The new exercise must stay self-contained, about as long as the original (a few sentences \
more at most), and be solvable by a single Python function; name that function and its \
parameters. Give no solution, hints or tests.
Reply with the text of the new exercise only.

Exercise:
{problem}
"""

SOLVE_PROMPT = """\
Solve the programming exercise below in Python. Reply with exactly three parts:
1. The solution: one ```python block with complete code (imports, helpers and the function), \
without example usage, input() or printing.
2. Unit tests: a second, separate ```python block that defines `def check(candidate):` and \
checks the function with assert statements calling `candidate` in its place, as HumanEval \
does. Cover typical and edge cases; every assert must hold for a correct solution.
3. A last line `Entry point: <name of the function the tests call>`.

Exercise:
{problem}
"""

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.S)
_PY_LANGS = ("", "python", "py", "python3")
_ENTRY = re.compile(
  r"^[ \t>*_#\d.)-]*entry[ _-]?point[*_ \t]*:[*_ \t]*`*([A-Za-z_]\w*)", re.I | re.M
)
# A label before the problem: "New problem:", "**Rewritten exercise:**", "## Harder task:".
_LABEL = re.compile(
  r"^\s*(?:\*\*|#{1,6}\s*)?(?:(?:the\s+)?(?:new|rewritten|revised|harder|evolved|updated|"
  r"more\s+difficult|modified)\s+)?(?:programming\s+|coding\s+)?(?:problem|exercise|task|"
  r"question|prompt|instruction)(?:\s+statement)?\s*(?:\*\*)?\s*:\s*(?:\*\*)?",
  re.I,
)
_PREAMBLE = re.compile(r"^\s*(?:sure[,.!]?\s*)?here(?:'s| is)\b[^\n]*:[ \t]*\n", re.I)
_QUOTES = (('"""', '"""'), ("'''", "'''"), ('"', '"'), ("'", "'"), ("\u201c", "\u201d"))


# ----------------------------------------------------------------------------- seeds


def read_seeds(path: str) -> list[str]:
  """Problem texts of a seeds JSONL, per line Code-Alpaca style (`instruction`, `input`,
  `output`) or HumanEval style (`task_id`, `prompt`, `test`, `entry_point`; the text is
  the prompt). Plain or gzip, local or gs:// (data.problems)."""
  seeds = []
  for lineno, r in read_jsonl(path, ()):
    where = f"{path}:{lineno}"
    if "prompt" in r:
      _require_strings(r, PROBLEM_FIELDS, (), where)
      text = r["prompt"]
    elif "instruction" in r:
      _require_strings(r, ("instruction",), ("input", "output"), where)
      text = r["instruction"].strip()
      if r.get("input", "").strip():
        text += "\n\nInput:\n" + r["input"].strip()
    else:
      raise InputError(
        f"{where}: neither a Code-Alpaca seed (instruction, input, output) nor a "
        f"HumanEval problem (task_id, prompt, test, entry_point)"
      )
    if not text.strip():
      raise InputError(f"{where}: empty problem text")
    seeds.append(text)
  if not seeds:
    raise InputError(f"{path}: no seeds")
  return seeds


def _require_strings(
  r: dict, required: tuple[str, ...], optional: tuple[str, ...], where: str
) -> None:
  for field in required + optional:
    if field not in r:
      if field in required:
        raise InputError(f"{where}: missing field {field!r}")
    elif not isinstance(r[field], str):
      raise InputError(f"{where}: field {field!r} must be a string, got {type(r[field]).__name__}")


# ----------------------------------------------------------------------------- prompts and parsing


def pick_method(seed: int, index: int, rnd: int) -> str:
  """The evolution method for seed `index` in round `rnd`: fixed, spread evenly."""
  names = sorted(METHODS)
  return names[_hash_int(f"method/{seed}/{index}/{rnd}") % len(names)]


def request_seed(seed: int, index: int, rnd: int, step: str) -> int:
  """The teacher's sampling seed for one request (deterministic, so cacheable)."""
  return _hash_int(f"{step}/{seed}/{index}/{rnd}") % (1 << 31)


def _hash_int(key: str) -> int:
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def evolve_prompt(problem: str, method: str) -> str:
  return EVOLVE_PROMPT.format(method=METHODS[method], problem=problem.strip())


def solve_prompt(problem: str) -> str:
  return SOLVE_PROMPT.format(problem=problem.strip())


def clean_problem(answer: str) -> str:
  """The new problem statement in an evolve answer: without a preamble ("Here is ...:"),
  a label ("New problem:"), a fence or quotes around all of it. "" if nothing is left."""
  text = answer.strip()
  while True:
    before = text
    text = _PREAMBLE.sub("", text, count=1).strip()
    text = _LABEL.sub("", text, count=1).strip()
    whole = re.fullmatch(r"```[\w+.-]*[ \t]*\n(.*?)\n?```", text, re.S)
    if whole and "```" not in whole.group(1):
      text = whole.group(1).strip()
    for left, right in _QUOTES:
      inner = text[len(left) : -len(right)]
      if (
        len(text) > len(left) + len(right)
        and text.startswith(left)
        and text.endswith(right)
        and left not in inner
        and right not in inner
      ):  # one pair around it all, not two quotations
        text = inner.strip()
        break
    if text == before:
      return text


@dataclasses.dataclass(frozen=True)
class Solved:
  solution: str  # the teacher's code; the program the sandbox runs
  test: str  # `def check(candidate): assert ...`
  entry_point: str  # the function the tests call as `candidate`
  signature: str  # `def name(args) -> ret` of the entry point, for the instruction


def parse_solution(answer: str) -> Solved:
  """Solution, tests and entry point of a solve answer; ValueError(reason) if unusable.

  The tests are the fenced block containing `def check(`; the solution the first other
  Python block; the entry point the `Entry point:` line when the solution defines that
  name at top level, else the solution's last top-level function.
  """
  blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer)]
  t = next((i for i, (_, body) in enumerate(blocks) if "def check(" in body), None)
  if t is None:
    raise ValueError("no fenced block defines check()")
  test = blocks[t][1]
  solution = next(
    (body for i, (lang, body) in enumerate(blocks) if lang in _PY_LANGS and i != t), None
  )
  if solution is None or not solution.strip():
    raise ValueError("no solution block besides the tests")
  try:
    tree = ast.parse(solution)
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"the solution does not parse: {e}") from None
  try:
    test_tree = ast.parse(test)
  except (SyntaxError, ValueError) as e:
    raise ValueError(f"the tests do not parse: {e}") from None
  if not any(isinstance(n, ast.Assert) for n in ast.walk(test_tree)):
    raise ValueError("the tests have no assert")
  defs = {
    n.name: n
    for n in tree.body
    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
  }
  outside = _FENCE.sub("", answer)
  named = _ENTRY.search(outside)
  if named and named.group(1) in defs:
    entry = named.group(1)
  else:
    functions = [
      n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    if not functions:
      raise ValueError("the solution defines no top-level function")
    entry = functions[-1]
  return Solved(
    solution.strip() + "\n", _strip_check_calls(test, test_tree), entry, _signature(defs[entry])
  )


def _strip_check_calls(test: str, tree: ast.Module) -> str:
  """The tests without top-level `check(...)` calls (the judge calls check itself)."""
  lines = test.splitlines()
  for node in reversed(tree.body):
    if (
      isinstance(node, ast.Expr)
      and isinstance(node.value, ast.Call)
      and isinstance(node.value.func, ast.Name)
      and node.value.func.id == "check"
    ):
      del lines[node.lineno - 1 : node.end_lineno]
  return "\n".join(lines).strip() + "\n"


def _signature(node: ast.AST) -> str:
  if isinstance(node, ast.ClassDef):
    return f"class {node.name}"
  ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
  return f"def {node.name}({ast.unparse(node.args)}){ret}"


def instruction(statement: str, solved: Solved) -> str:
  """The statement, plus the entry point's signature when the statement never names it
  (the student's code is called by that name)."""
  if re.search(rf"\b{re.escape(solved.entry_point)}\b", statement):
    return statement
  return f"{statement}\n\nWrite it as the Python function `{solved.signature}`."


# ----------------------------------------------------------------------------- decontamination


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
  words = re.findall(r"\w+", text.lower())
  return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


@functools.lru_cache(maxsize=4)
def humaneval_ngrams(n: int) -> dict[tuple[str, ...], str]:
  """Every word n-gram of the HumanEval prompts -> the first task_id that has it."""
  index: dict[tuple[str, ...], str] = {}
  for task_id, problem in load_problems("humaneval").items():
    for gram in word_ngrams(problem.prompt, n):
      index.setdefault(gram, task_id)
  return index


def contamination(text: str, index: dict[tuple[str, ...], str], n: int) -> tuple[str, str] | None:
  """(HumanEval task_id, first shared n-gram) if `text` shares an n-gram with a prompt."""
  for gram in word_ngrams(text, n):
    if gram in index:
      return index[gram], " ".join(gram)
  return None


# ----------------------------------------------------------------------------- the stage


@dataclasses.dataclass
class EvolveSummary:
  out_path: str
  ngram: int
  rounds: list[dict] = dataclasses.field(default_factory=list)
  methods: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  teacher: dict = dataclasses.field(default_factory=dict)

  @property
  def kept(self) -> int:
    return sum(r["kept"] for r in self.rounds)

  def totals(self) -> dict:
    keys = ("problems_in", "evolve_requests", "evolved", "solve_requests", "parse_failures", "kept")
    totals = {k: sum(r[k] for r in self.rounds) for k in keys}
    totals["contaminated"] = sum(len(r["contaminated"]) for r in self.rounds)
    totals["validation_failures"] = dict(
      sum(
        (collections.Counter(r["validation_failures"]) for r in self.rounds), collections.Counter()
      )
    )
    return totals

  def to_dict(self) -> dict:
    return {
      "out": self.out_path,
      "ngram": self.ngram,
      "rounds": self.rounds,
      "totals": self.totals(),
      "methods": dict(sorted(self.methods.items())),
      "teacher": self.teacher,
    }

  def report(self) -> str:
    lines = []
    for r in self.rounds:
      failed = ", ".join(f"{k} {v}" for k, v in sorted(r["validation_failures"].items())) or "none"
      lines.append(
        f"round {r['round']}: {r['problems_in']} in, {r['evolved']} evolved, "
        f"{len(r['contaminated'])} contaminated (HumanEval {self.ngram}-grams), "
        f"{r['parse_failures']} unparsable answers, failed validation: {failed}; kept {r['kept']}"
      )
    lines.append(
      f"wrote {self.kept} problems to {self.out_path} (report: {self.out_path}.report.json)"
    )
    lines.append("methods: " + ", ".join(f"{k} {v}" for k, v in sorted(self.methods.items())))
    if self.teacher:
      lines.append("teacher: " + ", ".join(f"{k} {v}" for k, v in self.teacher.items()))
    return "\n".join(lines)


def evolve_stage(
  seeds_path: str,
  out_path: str,
  client,
  *,
  rounds: int = 1,
  workers: int | None = None,
  timeout: float = 5.0,
  seed: int = 0,
  ngram: int = 10,
  max_tokens: int = 1024,
  temperature: float = 0.7,
  progress: bool = True,
) -> EvolveSummary:
  """Evolves the seeds for `rounds` rounds with the teacher `client` (a
  rrtf_jax.serving.teacher.TeacherClient); writes the kept problems to `out_path` (JSONL) and
  the report to `out_path + ".report.json"`."""
  from rrtf_jax.sandbox import Limits, Sandbox

  if rounds < 1:
    raise InputError(f"--rounds must be at least 1, got {rounds}")
  if ngram < 1:
    raise InputError(f"--ngram must be at least 1, got {ngram}")
  seeds = read_seeds(seeds_path)
  index = humaneval_ngrams(ngram)
  summary = EvolveSummary(out_path, ngram)
  parents = [{"seed": i, "task_id": None, "instruction": text} for i, text in enumerate(seeds)]
  kept_all = []
  start = _stats(client)
  with Sandbox(workers, Limits(timeout=timeout)) as box:
    for rnd in range(1, rounds + 1):
      report, parents = _round(
        parents,
        rnd,
        client,
        box,
        index,
        seed=seed,
        ngram=ngram,
        max_tokens=max_tokens,
        temperature=temperature,
        progress=progress,
      )
      summary.rounds.append(report)
      summary.methods.update(report["methods"])
      kept_all += parents
  end = _stats(client)
  summary.teacher = {k: end[k] - start.get(k, 0) for k in end}
  fields = (
    "task_id",
    "instruction",
    "test",
    "entry_point",
    "solution",
    "method",
    "round",
    "parent",
  )
  write_jsonl_atomic(out_path, ({k: p[k] for k in fields} for p in kept_all))
  write_jsonl_atomic(out_path + ".report.json", [summary.to_dict()])
  return summary


def _stats(client) -> dict:
  stats = getattr(client, "stats", None)
  return {k: getattr(stats, k) for k in ("requests", "cache_hits", "retries") if hasattr(stats, k)}


def _ask(client, requests: list[dict], desc: str, progress: bool) -> list[str]:
  """The first answer to each request, in order ("" when the teacher gave none)."""
  from tqdm import tqdm

  if not requests:
    return []
  with tqdm(
    total=len(requests), desc=desc, unit="request", disable=not progress, dynamic_ncols=True
  ) as bar:
    answers = client.map(requests, on_done=lambda *_: bar.update(1))
  return [a[0] if a else "" for a in answers]


def _round(
  parents: list[dict],
  rnd: int,
  client,
  box,
  index: dict,
  *,
  seed: int,
  ngram: int,
  max_tokens: int,
  temperature: float,
  progress: bool,
) -> tuple[dict, list[dict]]:
  """One round: (its report, the problems it kept)."""
  report = {
    "round": rnd,
    "problems_in": len(parents),
    "evolve_requests": 0,
    "evolved": 0,
    "evolve_empty": [],
    "contaminated": [],
    "solve_requests": 0,
    "parse_failures": 0,
    "parse_failed": [],
    "validation_failures": {},
    "validation_failed": [],
    "kept": 0,
    "methods": {},
  }
  methods = [pick_method(seed, p["seed"], rnd) for p in parents]
  report["methods"] = dict(sorted(collections.Counter(methods).items()))
  sampling = {"n": 1, "temperature": temperature, "max_tokens": max_tokens}
  evolve = [
    dict(
      sampling,
      prompt=evolve_prompt(p["instruction"], m),
      seed=request_seed(seed, p["seed"], rnd, "evolve"),
    )
    for p, m in zip(parents, methods)
  ]
  report["evolve_requests"] = len(evolve)
  candidates = []
  for p, method, answer in zip(parents, methods, _ask(client, evolve, f"evolve r{rnd}", progress)):
    task_id = f"evol/{p['seed']}/r{rnd}"
    statement = clean_problem(answer)
    if not statement:
      report["evolve_empty"].append(task_id)
      continue
    report["evolved"] += 1
    hit = contamination(statement, index, ngram)
    if hit:
      report["contaminated"].append({"task_id": task_id, "humaneval": hit[0], "ngram": hit[1]})
      continue
    candidates.append(
      {
        "seed": p["seed"],
        "task_id": task_id,
        "statement": statement,
        "method": method,
        "round": rnd,
        "parent": p["seed"] if p["task_id"] is None else p["task_id"],
      }
    )

  solve = [
    dict(
      sampling,
      prompt=solve_prompt(c["statement"]),
      seed=request_seed(seed, c["seed"], rnd, "solve"),
    )
    for c in candidates
  ]
  report["solve_requests"] = len(solve)
  solved = []
  for c, answer in zip(candidates, _ask(client, solve, f"solve r{rnd}", progress)):
    try:
      s = parse_solution(answer)
    except ValueError as e:
      report["parse_failed"].append({"task_id": c["task_id"], "reason": str(e)[:300]})
      continue
    solved.append(
      dict(
        c,
        instruction=instruction(c["statement"], s),
        solution=s.solution,
        test=s.test,
        entry_point=s.entry_point,
      )
    )
  report["parse_failures"] = len(report["parse_failed"])

  kept, report["validation_failed"] = validate(
    solved, box, desc=f"validate r{rnd}", progress=progress
  )
  failures = collections.Counter(f["outcome"] for f in report["validation_failed"])
  report["validation_failures"] = dict(sorted(failures.items()))
  report["kept"] = len(kept)
  return report, kept


def validate(
  problems: list[dict], box, *, desc: str = "validate", progress: bool = False
) -> tuple[list[dict], list[dict]]:
  """Runs each problem's `solution` against its `test` in the sandbox `box`:
  (the problems that passed, {task_id, outcome, tests_passed, tests_total, error} per other)."""
  from tqdm import tqdm

  from rrtf_jax.sandbox import Job

  jobs = [Job(p["solution"], p["test"], p["entry_point"]) for p in problems]
  with tqdm(
    total=len(jobs), desc=desc, unit="problem", disable=not progress, dynamic_ncols=True
  ) as bar:
    verdicts = list(box.map(jobs, on_done=lambda: bar.update(1))) if jobs else []
  kept, failed = [], []
  for p, v in zip(problems, verdicts):
    if v.passed:
      kept.append(p)
    else:
      failed.append(
        {
          "task_id": p["task_id"],
          "outcome": v.outcome,
          "tests_passed": v.tests_passed,
          "tests_total": v.tests_total,
          "error": v.error[:300],
        }
      )
  return kept, failed
