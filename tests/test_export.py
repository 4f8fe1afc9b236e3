"""`rrtf export`: ours -> HF is the exact inverse of `rrtf convert`, and transformers loads it."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import hf_logits
from model.convert import export_hf


def test_roundtrip_tensors_identical_and_transformers_loads(converted, tmp_path):
  from transformers import GPTBigCodeForCausalLM

  model, hf_dir, ckpt = converted
  out = export_hf(ckpt, str(tmp_path / "export"), progress=False)
  original = load_file(f"{hf_dir}/model.safetensors")
  exported = load_file(f"{out}/model.safetensors")
  original.pop("lm_head.weight", None)
  assert sorted(original) == sorted(exported)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype, name
    np.testing.assert_array_equal(exported[name], value, err_msg=name)

  reloaded = GPTBigCodeForCausalLM.from_pretrained(out).eval()
  assert reloaded.config.multi_query == model.config.multi_query
  tokens = np.random.RandomState(3).randint(0, 97, (2, 11))
  mask = np.ones_like(tokens)
  mask[0, :3] = 0
  np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(model, tokens, mask))


def test_export_shards_and_dtype(converted, tmp_path):
  from transformers import GPTBigCodeForCausalLM

  _, _, ckpt = converted
  out = export_hf(
    ckpt, str(tmp_path / "export"), dtype="bfloat16", max_shard_bytes=8 << 10, progress=False
  )
  import json
  import os

  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  files = set(index["weight_map"].values())
  assert len(files) > 1 and all(os.path.exists(os.path.join(out, f)) for f in files)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  m = GPTBigCodeForCausalLM.from_pretrained(out)
  assert str(m.transformer.wte.weight.dtype) == "torch.bfloat16"


def test_export_refuses_existing_output(converted, tmp_path):
  _, _, ckpt = converted
  (tmp_path / "taken").mkdir()
  with pytest.raises(FileExistsError, match="already exists"):
    export_hf(ckpt, str(tmp_path / "taken"), progress=False)
