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
as they arrive, so a rerun never pays for an answer twice. Every path may be local or gs:// (through fsspec).
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

from data import records
from data.prepared import prompt_text
from data.problems import InputError, read_jsonl, resolve

SAMPLES_NAME = "rrtf_samples"
# HumanEval's usual stops for completion-style problems: the function body ends where the
# next top-level statement begins.
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif ", "\nprint(")
CHAT_COMPLETION = ("Complete the following Python function. Reply with the whole function, imports "
                   "included, in one ```python code block.\n\n```python\n{prompt}```\n")
CHAT_INSTRUCTION = "{instruction}\n\nWrite the solution in Python, in one ```python code block.\n"
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


class Preempted(Exception):
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
      raise InputError(f"{where}: needs a 'prompt' (HumanEval style) or an 'instruction' (rrtf evolve) field")
    if not isinstance(r[key], str) or not r[key].strip():
      raise InputError(f"{where}: field {key!r} must be a non-empty string")
    if r["task_id"] in seen:
      raise InputError(f"{where}: duplicate task_id {r['task_id']!r}")
    seen.add(r["task_id"])
    out.append(SampleProblem(r["task_id"], r[key], r["test"], r["entry_point"],
                             r[key] if key == "prompt" else ""))
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
      rest = stripped[len(prefix):]
      return rest[1:] if problem.exec_prefix.endswith("\n") and rest.startswith("\n") else rest
  return code


def derive_seed(*parts) -> int:
  """A 32-bit seed from any parts (e.g. seed, task_id, sample index), stable across runs."""
  return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:4], "little")


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
    return dict(prompt=prompt, n=self.samples, temperature=self.temperature, top_p=self.top_p,
                max_tokens=self.max_tokens, stop=stop, seed=derive_seed(seed, "teacher", problem.task_id))


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
    return (f"sampled {self.problems} problems in files {self.files_done or '-'} of {self.files} "
            f"(skipped, already done: {self.files_skipped or '-'}): {self.student_responses} student and "
            f"{self.teacher_responses} teacher responses; teacher HTTP requests {self.teacher_requests}, "
            f"answers from the cache {self.teacher_cache_hits}")


def output_files(out_dir: str, count: int) -> list[str]:
  return [os.path.join(out_dir, records.shard_name(SAMPLES_NAME, "train", j, count)) for j in range(count)]


def sample_stage(problems_spec: str, out_dir: str, *, decoder=None, num_samples: int = 4,
                 temperatures: tuple[float, ...] = (0.8,), top_p: float = 0.95, max_new_tokens: int = 512,
                 stop: tuple[str, ...] | None = None, teacher: Teacher | None = None, seed: int = 0,
                 problems_per_file: int = 64, shard: int = 0, num_shards: int = 1, student_name: str = "student",
                 progress: bool = True) -> SampleSummary:
  """Samples every problem of this process's files; see the module docstring.

  Args:
    decoder: model.decode.Decoder of the student (None with num_samples=0).
    temperatures: student sample i uses temperatures[i % len(temperatures)].
    stop: stop sequences of the student; default COMPLETION_STOPS for completion-style
      problems and none (EOS) for instruction-style ones.
  """
  from tqdm import tqdm

  from model.decode import Request
  if not 0 <= shard < num_shards:
    raise InputError(f"--shard {shard} is not in [0, --num-shards {num_shards})")
  if num_samples < 0 or problems_per_file < 1 or not temperatures:
    raise InputError("--num-samples must be >= 0, --problems-per-file >= 1, and a temperature given")
  if num_samples and decoder is None:
    raise InputError("student samples need a model (--ckpt)")
  problems = load_problems(problems_spec)
  count = -(-len(problems) // problems_per_file)
  outputs = output_files(out_dir, count)
  summary = SampleSummary(files=count)
  todo = []
  for j in range(shard, count, num_shards):
    (summary.files_skipped if records.exists(outputs[j]) else todo).append(j)
  if num_samples:  # every prompt must fit before any work starts
    limit = decoder.config.max_position_embeddings
    for j in todo:
      for p in problems[j * problems_per_file:(j + 1) * problems_per_file]:
        n = len(decoder.tokenizer.encode(p.student_text()))
        if n >= limit:
          raise InputError(f"{problems_spec}: problem {p.task_id}: its prompt is {n} tokens, which leaves no room "
                           f"in the student's {limit} positions")
  stats0 = _teacher_stats(teacher)
  if todo:
    records.makedirs(out_dir)
  pool = concurrent.futures.ThreadPoolExecutor(1)
  cancel = threading.Event()
  try:
    with _sigterm_stops(cancel):
      for j in todo:
        chunk = problems[j * problems_per_file:(j + 1) * problems_per_file]
        asks = teacher is not None and teacher.client is not None
        total = len(chunk) * num_samples + (len(chunk) if asks else 0)
        with tqdm(total=total, desc=f"sample file {j + 1}/{count}", unit="response", disable=not progress,
                  dynamic_ncols=True) as bar:
          pending = None
          if asks:  # teacher requests go out while the student decodes
            reqs = [teacher.request(p, seed) for p in chunk]
            pending = pool.submit(teacher.client.map, reqs, lambda: bar.update(1), cancel)
          rows = [Request(p.student_text(), max_new_tokens=max_new_tokens,
                          temperature=temperatures[i % len(temperatures)], top_p=top_p,
                          stop=tuple(stop) if stop is not None else COMPLETION_STOPS if p.completion_style else (),
                          seed=derive_seed(seed, "student", p.task_id, i))
                  for p in chunk for i in range(num_samples)]
          gens = decoder.generate(rows, on_batch=bar.update) if rows else []
          answers = pending.result() if pending is not None else None
        recs = []
        for k, p in enumerate(chunk):
          out = [(student_name, g.text, g.text if p.completion_style else extract_code(g.text), 0)
                 for g in gens[k * num_samples:(k + 1) * num_samples]]
          if answers is not None:
            chat = teacher.client.api == "chat"
            out += [(teacher.name, t, teacher_code(p, t, chat), 1) for t in answers[k]]
          if teacher is not None and teacher.answers is not None:
            out += [(src, t, teacher_code(p, t, is_chat), 1) for src, t, is_chat in teacher.answers.get(p.task_id, ())]
          recs.append(dict(task_id=p.task_id, prompt=p.prompt, test=p.test, entry_point=p.entry_point,
                           exec_prefix=p.exec_prefix, sources=[o[0] for o in out], responses=[o[1] for o in out],
                           codes=[o[2] for o in out], is_teacher=[o[3] for o in out]))
          summary.student_responses += sum(1 for o in out if not o[3])
          summary.teacher_responses += sum(1 for o in out if o[3])
        records.write_atomic(outputs[j], recs, ranked=False)
        summary.problems += len(chunk)
        summary.files_done.append(j)
  finally:  # on any exit, teacher requests not yet sent are dropped; those in flight land in the cache
    cancel.set()
    pool.shutdown(wait=True, cancel_futures=True)
  stats1 = _teacher_stats(teacher)
  summary.teacher_requests = stats1[0] - stats0[0]
  summary.teacher_cache_hits = stats1[1] - stats0[1]
  return summary


def _teacher_stats(teacher) -> tuple[int, int]:
  stats = getattr(getattr(teacher, "client", None), "stats", None)
  return (stats.requests, stats.cache_hits) if stats is not None else (0, 0)


def default_cache_dir(out_dir: str) -> str:
  return os.path.join(out_dir, ".teacher-cache")


