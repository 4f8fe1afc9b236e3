"""The documents users read stay inside the repository and name what is there: every relative
link in the committed Markdown files, and every repository path they quote (`rrtf_jax/...py`),
points to a file or folder of the repository. (The README once sent users to
`../shared/ARCHITECTURE.md`, a team note they never get, and paths go stale when modules move.)"""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A quoted path: `../x` or `top/.../name.ext` under one of the repository's folders.
FOLDERS = ("rrtf_jax", "model", "data", "configs", "launch", "tests", "benchmarks", "docs")
QUOTED = re.compile(r"`((?:\.\./|(?:%s)/)[\w./-]*)`" % "|".join(FOLDERS))


def _docs() -> list[str]:
  out = subprocess.run(
    ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  return [d for d in out if not d.startswith("benchmarks/results/")]  # generated tables


def _missing(doc: str, target: str, base: str) -> bool:
  path = os.path.normpath(os.path.join(ROOT, base, target.split("#")[0]))
  return os.path.relpath(path, ROOT).startswith("..") or not os.path.exists(path)


def test_links_and_quoted_paths_resolve_inside_the_repository():
  docs = _docs()
  assert "README.md" in docs and "docs/architecture.md" in docs
  bad = []
  for doc in docs:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      text = f.read()
    for target in LINK.findall(text):
      if not (re.match(r"[a-z]+:", target) or target.startswith("#")):  # not a URL or an anchor
        bad += [f"{doc}: link {target}"] if _missing(doc, target, os.path.dirname(doc)) else []
    for target in QUOTED.findall(text):
      if "*" not in target and _missing(doc, target, ""):  # quoted from the repository's root
        bad.append(f"{doc}: path {target}")
  assert not bad, bad
