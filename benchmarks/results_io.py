"""Writing a benchmark's figures: JSON at --out and a Markdown table beside it (.md)."""

from __future__ import annotations

import json
import os
from typing import Callable


def md_path(json_path: str) -> str:
  return os.path.splitext(json_path)[0] + ".md"


def write(json_path: str, result: dict, markdown: Callable[[dict], str]) -> None:
  """Writes `result` to json_path and markdown(result) beside it, and prints the Markdown."""
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(result, f, indent=2)
  _write_md(json_path, markdown(result))
  print(f"wrote {json_path} and {md_path(json_path)}")


def rewrite_markdown(json_path: str, markdown: Callable[[dict], str]) -> None:
  """--report-only: the Markdown again from the stored JSON, nothing run."""
  with open(json_path) as f:
    _write_md(json_path, markdown(json.load(f)))
  print(f"wrote {md_path(json_path)}")


def _write_md(json_path: str, md: str) -> None:
  with open(md_path(json_path), "w") as f:
    f.write(md)
  print("\n" + md)
