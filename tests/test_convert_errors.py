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


def _edit_config(hf_dir, edit):
  path = os.path.join(hf_dir, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  edit(cfg)
  with open(path, "w") as f:
    json.dump(cfg, f)
  return path


@pytest.fixture(scope="module")
def qwen2_hf(tmp_path_factory):
  """A tiny Qwen2 HF checkpoint; each test edits a copy of its config.json."""
  from conftest import make_family_model

  return save_hf(make_family_model("qwen2", seed=3), tmp_path_factory.mktemp("qwen2") / "hf")


def _copy(src, tmp_path):
  import shutil

  return shutil.copytree(src, tmp_path / "hf")


REFUSED = {
  # (edit of config.json, words the one line must hold)
  "unknown architecture": (
    lambda c: c.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe"),
    ["Qwen3MoeForCausalLM", "not supported", "Qwen2ForCausalLM", "Starcoder2ForCausalLM"],
  ),
  "unknown model_type": (
    lambda c: c.update(architectures=None, model_type="gemma"),
    ["'gemma'", "not supported", "starcoder2", "qwen3"],
  ),
  "mismatched model_type": (
    lambda c: c.update(model_type="llama"),
    ["'llama'", "Qwen2ForCausalLM"],
  ),
  "rope scaling": (
    lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
    ["'yarn'", "default, linear, llama3"],
  ),
  "old-style rope scaling": (
    lambda c: c.pop("rope_parameters") and c.update(rope_scaling={"type": "dynamic", "factor": 2}),
    ["'dynamic'", "not supported"],
  ),
  "mixture of experts": (lambda c: c.update(num_experts=8), ["num_experts", "mixture-of-experts"]),
  "window on some layers": (
    lambda c: c.update(
      use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"]
    ),
    ["use_sliding_window", "some layers"],
  ),
  "pre-quantized": (
    lambda c: c.update(quantization_config={"quant_method": "gptq"}),
    ["quantization_config", "pre-quantized"],
  ),
  "activation": (lambda c: c.update(hidden_act="relu2"), ["hidden_act='relu2'", "silu"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_config_is_refused(case, qwen2_hf, tmp_path, capfd):
  """An architecture or setting we do not implement: one line naming it and what is supported,
  exit 2, nothing written."""
  edit, words = REFUSED[case]
  hf_dir = _copy(qwen2_hf, tmp_path)
  cfg_path = _edit_config(hf_dir, edit)
  out = str(tmp_path / "out")
  rc, lines = _convert(hf_dir, out, capfd)
  assert rc == 2 and len(lines) == 1, lines
  assert cfg_path in lines[0] and all(w in lines[0] for w in words), lines[0]
  _assert_no_output(out)


def test_export_refuses_what_the_family_cannot_express(converted, tmp_path, capfd):
  """A GPTBigCode checkpoint changed to grouped-query attention has no GPTBigCode form: export
  names the setting, exit 2, nothing written; the Starcoder2 form would take it."""
  from model import load_checkpoint, save_checkpoint
  from rrtf_jax.cli import main

  _, _, ckpt = converted
  cfg, params = load_checkpoint(ckpt)
  bad = save_checkpoint(str(tmp_path / "rope"), cfg.replace(position_embedding="rope"), params)
  out = str(tmp_path / "export")
  capfd.readouterr()
  assert main(["export", "--ckpt", bad, "--out", out]) == 2
  lines = [s for s in capfd.readouterr().err.splitlines() if s.startswith("rrtf export:")]
  assert len(lines) == 1 and "GPTBigCode has no position_embedding='rope'" in lines[0], lines
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
