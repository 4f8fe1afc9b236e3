"""Bad HF checkpoints fail with one line naming the file and tensor, exit 2, and no output."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import make_hf_model, save_hf


@pytest.fixture()
def hf_dir(tmp_path):
  return save_hf(make_hf_model(True, seed=2), tmp_path / "hf")


def _convert(hf_dir, out, capfd):
  """`rrtf convert` through cli.main (what the console script runs) in this process, its stderr
  captured at the file descriptor: a subprocess per case paid ~2 s of start-up for a failure."""
  from rrtf_jax.cli import main

  capfd.readouterr()
  code = main(["convert", "--hf-dir", str(hf_dir), "--out", str(out)])
  lines = [s for s in capfd.readouterr().err.splitlines() if s.startswith("rrtf convert:")]
  return code, lines


def _edit_tensors(hf_dir, edit):
  """Rewrites model.safetensors after `edit(tensors)`; returns its path."""
  path = os.path.join(hf_dir, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})
  return path


def _assert_no_output(out):
  parent = os.path.dirname(out)
  assert not os.path.exists(out)
  assert not [n for n in os.listdir(parent) if n.startswith(os.path.basename(out))], os.listdir(
    parent
  )


def test_not_gpt_bigcode(hf_dir, tmp_path, capfd):
  cfg_path = os.path.join(hf_dir, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["model_type"] = "llama"
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  out = str(tmp_path / "out")
  rc, lines = _convert(hf_dir, out, capfd)
  assert rc == 2 and len(lines) == 1
  assert cfg_path in lines[0] and "llama" in lines[0] and "gpt_bigcode" in lines[0]
  _assert_no_output(out)


def test_missing_tensor(hf_dir, tmp_path, capfd):
  path = _edit_tensors(hf_dir, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
  out = str(tmp_path / "out")
  rc, lines = _convert(hf_dir, out, capfd)
  assert rc == 2 and len(lines) == 1
  assert path in lines[0] and "transformer.h.1.mlp.c_fc.bias" in lines[0] and "missing" in lines[0]
  _assert_no_output(out)


def test_shape_disagrees_with_config(hf_dir, tmp_path, capfd):
  mha_rows = np.zeros((40, 32), np.float32)  # MHA-sized c_attn in an MQA model
  path = _edit_tensors(hf_dir, lambda t: t.update({"transformer.h.0.attn.c_attn.weight": mha_rows}))
  out = str(tmp_path / "out")
  rc, lines = _convert(hf_dir, out, capfd)
  assert rc == 2 and len(lines) == 1
  assert (
    path in lines[0] and "transformer.h.0.attn.c_attn.weight" in lines[0] and "[40, 32]" in lines[0]
  )
  _assert_no_output(out)


def test_failure_while_writing_leaves_nothing(hf_dir, tmp_path, monkeypatch):
  """A failure after the temporary directory exists (e.g. disk full) removes it."""
  from model import checkpoint, convert

  def boom(path, params):
    assert os.path.isdir(path)
    raise OSError("disk full")

  monkeypatch.setattr(checkpoint, "write_params", boom)
  out = str(tmp_path / "out")
  with pytest.raises(OSError, match="disk full"):
    convert.convert_hf(hf_dir, out, progress=False)
  _assert_no_output(out)


def test_no_safetensors(hf_dir, tmp_path, capfd):
  os.remove(os.path.join(hf_dir, "model.safetensors"))
  rc, lines = _convert(hf_dir, tmp_path / "out", capfd)
  assert rc == 2 and len(lines) == 1 and "no model.safetensors" in lines[0]


def test_existing_output_is_not_touched(hf_dir, tmp_path, capfd):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  rc, lines = _convert(hf_dir, out, capfd)
  assert rc == 2 and "already exists" in lines[0]
  assert (out / "keep.txt").read_text() == "x"
