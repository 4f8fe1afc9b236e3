"""Sampling: responses to every problem from the student (our model) and from teachers.

Problems (JSONL, or `humaneval`), one of two styles per line:
  completion   HumanEval style: `task_id`, `prompt` (signature + docstring), `test`,
               `entry_point`. The program run by `rrtf rank` is the prompt followed by the
               response (exec_prefix = prompt).
  instruction  what `rrtf evolve` writes: `task_id`, `instruction`, `test`, `entry_point`
               (other fields ignored). The response is the whole program (exec_prefix = "").
The student sees what training will show it (data/prepared.py): the problem between triple
quotes, then exec_prefix, and continues with code. Teachers are asked over an
OpenAI-compatible API (chat: a plain request for a ```python block; completions: the
student's text) or read from a JSONL file of collected answers (`task_id` and `response`,
a chat answer, or `completion`, a continuation of the prompt; optional `model`).

Output: samples TFRecords (schema in data/records.py), one record per problem holding all its
responses, files of `problems_per_file` problems named like TFDS shards; process i of n
takes files i, i+n, ... Each file appears only when complete (data/records.py: locally a
temporary name renamed, on gs:// an upload), and a rerun skips finished files. Student rows
carry seeds derived from (seed, task_id, sample index), so a rerun regenerates the same
tokens; teacher answers are cached on disk by request hash (`<out>/.teacher-cache`) as soon
as they arrive, so a rerun never pays for an answer twice. Every path may be local or gs://
(through fsspec).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import re
import signal
import threading
from typing import Iterable, NamedTuple, Sequence

from data import records
from data.prepared import prompt_text
from data.problems import InputError, read_jsonl, resolve
from data.tokenizer import encode_prompt

SAMPLES_NAME = "rrtf_samples"
# HumanEval's usual stops for completion-style problems: the function body ends where the
# next top-level statement begins.
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif ", "\nprint(")
CHAT_COMPLETION = (
  "Complete the following Python function. Reply with the whole function, imports "
  "included, in one ```python code block.\n\n```python\n{prompt}```\n"
)
CHAT_INSTRUCTION = "{instruction}\n\nWrite the solution in Python, in one ```python code block.\n"
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


class Preempted(Exception):  # noqa: N818  (names the signal it stands for, SIGTERM)
  """SIGTERM arrived: finished files are kept and every teacher answer received is cached."""


@contextlib.contextmanager
def _sigterm_stops(cancel: threading.Event):
  """SIGTERM (a preempted VM, `kill`) raises Preempted in the main thread and sets `cancel`;
  a second SIGTERM kills at once."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    cancel.set()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Preempted()

  old = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


@dataclasses.dataclass(frozen=True)
class SampleProblem:
  task_id: str
  prompt: str  # the problem as trained on: HumanEval prompt or instruction text
  test: str
  entry_point: str
  exec_prefix: str  # the HumanEval prompt (completion style) or "" (instruction style)

  @property
  def completion_style(self) -> bool:
    return bool(self.exec_prefix)

  def student_text(self) -> str:
    return prompt_text(self.prompt) + self.exec_prefix


def load_problems(spec: str) -> list[SampleProblem]:
  """Problems of either style from `humaneval` or a JSONL file; errors name file and line."""
  path = resolve(spec)
  out, seen = [], set()
  for lineno, r in read_jsonl(path, ("task_id", "test", "entry_point")):
    where = f"{path}:{lineno}"
    key = "prompt" if "prompt" in r else "instruction" if "instruction" in r else None
    if key is None:
      raise InputError(
        f"{where}: needs a 'prompt' (HumanEval style) or an 'instruction' (rrtf evolve) field"
      )
    if not isinstance(r[key], str) or not r[key].strip():
      raise InputError(f"{where}: field {key!r} must be a non-empty string")
    if r["task_id"] in seen:
      raise InputError(f"{where}: duplicate task_id {r['task_id']!r}")
    seen.add(r["task_id"])
    out.append(
      SampleProblem(
        r["task_id"], r[key], r["test"], r["entry_point"], r[key] if key == "prompt" else ""
      )
    )
  if not out:
    raise InputError(f"{path}: no problems")
  return out


def extract_code(response: str) -> str:
  """The code in a response: its first ```python (or untagged) fenced block, a block cut off
  by the length limit included; the whole text when there is no fence."""
  blocks = _FENCE.findall(response)
  for lang, body in blocks:
    if lang.lower() in ("", "python", "py", "python3"):
      return body
  return blocks[0][1] if blocks else response


def teacher_code(problem: SampleProblem, response: str, chat: bool) -> str:
  """The code of a teacher response, as a continuation of exec_prefix. A chat answer to a
  completion-style problem is usually the whole function: its repeat of the prompt, when it
  has one, is dropped; otherwise the function stands on its own after the prompt (a
  redefinition, which Python allows)."""
  if not chat:
    return response if problem.completion_style else extract_code(response)
  code = extract_code(response)
  if problem.completion_style:
    prefix = problem.exec_prefix.strip("\n")
    stripped = code.lstrip("\n")
    if stripped.startswith(prefix):
      rest = stripped[len(prefix) :]
      return rest[1:] if problem.exec_prefix.endswith("\n") and rest.startswith("\n") else rest
  return code


def derive_seed(*parts) -> int:
  """A 32-bit seed from any parts (e.g. seed, task_id, sample index), stable across runs."""
  return int.from_bytes(
    hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:4], "little"
  )


class Response(NamedTuple):
  """One response of a samples record (data/records.py)."""

  source: str  # the model's name
  response: str  # as trained on
  code: str  # program = exec_prefix + code
  is_teacher: int  # 1 for a teacher's, 0 for the student's


@dataclasses.dataclass
class Teacher:
  """Where teacher responses come from: an OpenAI-compatible client, or answers from a file."""

  client: object | None = None  # rrtf_jax.serving.teacher.TeacherClient
  answers: dict | None = None  # task_id -> [(source, response, is_chat)]
  samples: int = 1
  temperature: float = 0.8
  top_p: float = 0.95
  max_tokens: int = 512

  @property
  def name(self) -> str:
    return getattr(self.client, "model", "teacher")

  def request(self, problem: SampleProblem, seed: int) -> dict:
    chat = self.client.api == "chat"
    if not chat:
      prompt = problem.student_text()
    elif problem.completion_style:
      prompt = CHAT_COMPLETION.format(prompt=problem.prompt)
    else:
      prompt = CHAT_INSTRUCTION.format(instruction=problem.prompt)
    stop = list(COMPLETION_STOPS) if problem.completion_style and not chat else None
    return dict(
      prompt=prompt,
      n=self.samples,
      temperature=self.temperature,
      top_p=self.top_p,
      max_tokens=self.max_tokens,
      stop=stop,
      seed=derive_seed(seed, "teacher", problem.task_id),
    )

  @property
  def asks(self) -> bool:
    """Whether there is an endpoint to send requests to (else only answers from a file)."""
    return self.client is not None

  def responses(self, problem: SampleProblem, asked: list[str] | None) -> list[Response]:
    """The teacher responses to `problem`: the endpoint's answers `asked` (None when not asked),
    then the file's."""
    out = []
    if asked is not None:
      chat = self.client.api == "chat"
      out += [Response(self.name, t, teacher_code(problem, t, chat), 1) for t in asked]
    if self.answers is not None:
      out += [
        Response(source, t, teacher_code(problem, t, is_chat), 1)
        for source, t, is_chat in self.answers.get(problem.task_id, ())
      ]
    return out


def load_teacher_file(path: str, problems: list[SampleProblem]) -> dict:
  """task_id -> [(source, response, is_chat)] from a JSONL of collected teacher answers."""
  known = {p.task_id for p in problems}
  out = collections.defaultdict(list)
  for lineno, r in read_jsonl(path, ("task_id",)):
    where = f"{path}:{lineno}"
    if r["task_id"] not in known:
      raise InputError(f"{where}: task_id {r['task_id']!r} is not among the problems")
    key = "response" if "response" in r else "completion" if "completion" in r else None
    if key is None or not isinstance(r[key], str):
      raise InputError(f"{where}: needs a string 'response' (a chat answer) or 'completion' field")
    model = r.get("model", "teacher-file")
    if not isinstance(model, str):
      raise InputError(f"{where}: field 'model' must be a string")
    out[r["task_id"]].append((model, r[key], key == "response"))
  return dict(out)


@dataclasses.dataclass
class SampleSummary:
  files: int = 0
  files_done: list[int] = dataclasses.field(default_factory=list)
  files_skipped: list[int] = dataclasses.field(default_factory=list)
  problems: int = 0
  student_responses: int = 0
  teacher_responses: int = 0
  teacher_requests: int = 0
  teacher_cache_hits: int = 0

  def report(self) -> str:
    return (
      f"sampled {self.problems} problems in files {self.files_done or '-'} of {self.files} "
      f"(skipped, already done: {self.files_skipped or '-'}): {self.student_responses} student and "
      f"{self.teacher_responses} teacher responses; teacher HTTP requests {self.teacher_requests}, "
      f"answers from the cache {self.teacher_cache_hits}"
    )

  def add_file(self, j: int, recs: list[dict]) -> None:
    """Counts file j, written with `recs`."""
    for r in recs:
      self.student_responses += r["is_teacher"].count(0)
      self.teacher_responses += r["is_teacher"].count(1)
    self.problems += len(recs)
    self.files_done.append(j)

  def add_teacher_stats(self, before: tuple[int, int], after: tuple[int, int]) -> None:
    """The teacher's (requests, cache hits) of this run, from its counters before and after."""
    self.teacher_requests = after[0] - before[0]
    self.teacher_cache_hits = after[1] - before[1]


def output_files(out_dir: str, count: int) -> list[str]:
  return [
    os.path.join(out_dir, records.shard_name(SAMPLES_NAME, "train", j, count)) for j in range(count)
  ]


# -------------------------------------------- shared with `rrtf evaluate` (its parts are files)


@dataclasses.dataclass(frozen=True)
class FilePlan:
  """`problems` in files of `per_file` each, in order; process `shard` of `num_shards` does
  files shard, shard + num_shards, ..."""

  problems: Sequence
  per_file: int
  shard: int = 0
  num_shards: int = 1

  @property
  def count(self) -> int:
    return -(-len(self.problems) // self.per_file)

  @property
  def mine(self) -> list[int]:
    """This process's files."""
    return list(range(self.shard, self.count, self.num_shards))

  def chunk(self, j: int) -> Sequence:
    """The problems of file j."""
    return self.problems[j * self.per_file : (j + 1) * self.per_file]

  def unwritten(self, paths: Sequence[str]) -> list[int]:
    """This process's files j whose paths[j] does not exist (a file appears only when complete)."""
    return records.shard_plan(paths, self.shard, self.num_shards)[0]


def check_prompts_fit(
  decoder, prompts: Iterable[tuple[str, str]], where: str, *, model: str = "student", kind: str = ""
) -> None:
  """Fails on the first (task_id, prompt text) whose tokens leave `decoder` no position to
  generate in; `kind` qualifies "its prompt" in the message."""
  limit = decoder.config.max_position_embeddings
  for task_id, text in prompts:
    n = len(encode_prompt(decoder.tokenizer, text))  # what generation feeds: BOS included
    if n >= limit:
      raise InputError(
        f"{where}: problem {task_id}: its prompt{kind} is {n} tokens, which "
        f"leaves no room in the {model}'s {limit} positions"
      )


# ------------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class _Student:
  """How the student samples: `num_samples` rows per problem from `decoder`."""

  decoder: object | None  # model.decode.Decoder; None when num_samples is 0
  num_samples: int
  temperatures: Sequence[float]  # row i of a problem uses temperatures[i % len(temperatures)]
  top_p: float
  max_new_tokens: int
  stop: Sequence[str] | None  # None: COMPLETION_STOPS for completion-style problems, else EOS only
  seed: int
  name: str

  def generate(self, chunk: Sequence[SampleProblem], on_batch) -> list:
    """Generations of `chunk`'s rows: num_samples per problem, in problem order."""
    from model.decode import Request

    rows = [
      Request(
        p.student_text(),
        max_new_tokens=self.max_new_tokens,
        temperature=self.temperatures[i % len(self.temperatures)],
        top_p=self.top_p,
        stop=self._stops(p),
        seed=derive_seed(self.seed, "student", p.task_id, i),
      )
      for p in chunk
      for i in range(self.num_samples)
    ]
    return self.decoder.generate(rows, on_batch=on_batch) if rows else []

  def _stops(self, problem: SampleProblem) -> tuple[str, ...]:
    if self.stop is not None:
      return tuple(self.stop)
    return COMPLETION_STOPS if problem.completion_style else ()

  def responses(self, problem: SampleProblem, gens: Sequence) -> list[Response]:
    if problem.completion_style:
      return [Response(self.name, g.text, g.text, 0) for g in gens]
    return [Response(self.name, g.text, extract_code(g.text), 0) for g in gens]


def sample_stage(
  problems_spec: str,
  out_dir: str,
  *,
  decoder=None,
  num_samples: int = 4,
  temperatures: tuple[float, ...] = (0.8,),
  top_p: float = 0.95,
  max_new_tokens: int = 512,
  stop: tuple[str, ...] | None = None,
  teacher: Teacher | None = None,
  seed: int = 0,
  problems_per_file: int = 64,
  shard: int = 0,
  num_shards: int = 1,
  student_name: str = "student",
  progress: bool = True,
) -> SampleSummary:
  """Samples every problem of this process's files; see the module docstring.

  Args:
    decoder: model.decode.Decoder of the student (None with num_samples=0).
    temperatures: student sample i uses temperatures[i % len(temperatures)].
    stop: stop sequences of the student; default COMPLETION_STOPS for completion-style
      problems and none (EOS) for instruction-style ones.
  """
  _check_arguments(decoder, num_samples, temperatures, problems_per_file, shard, num_shards)
  files = FilePlan(load_problems(problems_spec), problems_per_file, shard, num_shards)
  outputs = output_files(out_dir, files.count)
  todo, skipped = records.shard_plan(outputs, shard, num_shards)
  summary = SampleSummary(files=files.count, files_skipped=skipped)
  if num_samples:  # every prompt must fit before any work starts
    prompts = ((p.task_id, p.student_text()) for j in todo for p in files.chunk(j))
    check_prompts_fit(decoder, prompts, problems_spec)
  student = _Student(
    decoder, num_samples, temperatures, top_p, max_new_tokens, stop, seed, student_name
  )
  stats_before = _teacher_stats(teacher)
  if todo:
    records.makedirs(out_dir)
  pool = concurrent.futures.ThreadPoolExecutor(1)
  cancel = threading.Event()
  try:
    with _sigterm_stops(cancel):
      for j in todo:
        recs = _sample_file(
          files.chunk(j),
          student,
          teacher,
          pool,
          cancel,
          desc=f"sample file {j + 1}/{files.count}",
          progress=progress,
        )
        records.write_atomic(outputs[j], recs, ranked=False)
        summary.add_file(j, recs)
  finally:
    # On any exit, teacher requests not yet sent are dropped; those in flight land in the cache.
    cancel.set()
    pool.shutdown(wait=True, cancel_futures=True)
  summary.add_teacher_stats(stats_before, _teacher_stats(teacher))
  return summary


def _check_arguments(decoder, num_samples, temperatures, problems_per_file, shard, num_shards):
  records.check_shard(shard, num_shards)
  if num_samples < 0 or problems_per_file < 1 or not temperatures:
    raise InputError(
      "--num-samples must be >= 0, --problems-per-file >= 1, and a temperature given"
    )
  if num_samples and decoder is None:
    raise InputError("student samples need a model (--ckpt)")


def _sample_file(
  chunk: Sequence[SampleProblem],
  student: _Student,
  teacher: Teacher | None,
  pool: concurrent.futures.Executor,
  cancel: threading.Event,
  *,
  desc: str,
  progress: bool,
) -> list[dict]:
  """The records of one file's problems, under one progress bar (a tick per response)."""
  from tqdm import tqdm

  asks = teacher is not None and teacher.asks
  total = len(chunk) * student.num_samples + (len(chunk) if asks else 0)
  with tqdm(
    total=total, desc=desc, unit="response", disable=not progress, dynamic_ncols=True
  ) as bar:
    pending = None
    if asks:  # teacher requests go out while the student decodes
      requests = [teacher.request(p, student.seed) for p in chunk]
      pending = pool.submit(teacher.client.map, requests, lambda: bar.update(1), cancel)
    gens = student.generate(chunk, bar.update)
    asked = pending.result() if asks else [None] * len(chunk)
  n = student.num_samples
  return [
    _record(
      p,
      student.responses(p, gens[k * n : (k + 1) * n])
      + (teacher.responses(p, asked[k]) if teacher is not None else []),
    )
    for k, p in enumerate(chunk)
  ]


def _record(problem: SampleProblem, responses: list[Response]) -> dict:
  """A samples record (data/records.py)."""
  return dict(
    task_id=problem.task_id,
    prompt=problem.prompt,
    test=problem.test,
    entry_point=problem.entry_point,
    exec_prefix=problem.exec_prefix,
    sources=[r.source for r in responses],
    responses=[r.response for r in responses],
    codes=[r.code for r in responses],
    is_teacher=[r.is_teacher for r in responses],
  )


def _teacher_stats(teacher) -> tuple[int, int]:
  stats = getattr(getattr(teacher, "client", None), "stats", None)
  return (stats.requests, stats.cache_hits) if stats is not None else (0, 0)


def default_cache_dir(out_dir: str) -> str:
  return os.path.join(out_dir, ".teacher-cache")
