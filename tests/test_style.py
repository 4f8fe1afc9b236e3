"""The committed ruff config (ruff.toml) holds over the tree: lint clean and formatted. CI runs
it through this test, so the README's test command checks style too."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"]
)
def test_ruff(args):
  r = subprocess.run(
    [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
  )
  assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
