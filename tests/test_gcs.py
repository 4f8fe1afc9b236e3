"""gs:// checkpoints through a real GCS emulator: convert to, load from, export from a bucket."""

import os

import fsspec
import jax
import numpy as np
import pytest

from conftest import make_hf_model, save_hf
from model import ModelConfig, init_params, load_checkpoint, save_checkpoint
from model.checkpoint import PARAMS_DIR, is_checkpoint


def _fs():
  import gcsfs

  return gcsfs.GCSFileSystem(token="anon", project="test")


def test_convert_to_bucket_and_export_back(gcs_bucket, tmp_path):
  from model.convert import convert_hf, export_hf

  model = make_hf_model(True, seed=5)
  hf_dir = save_hf(model, tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": true}')
  out = convert_hf(hf_dir, f"{gcs_bucket}/starcoder-tiny", progress=False)
  assert out == f"{gcs_bucket}/starcoder-tiny" and is_checkpoint(out)
  with fsspec.open(f"{out}/tokenizer/tokenizer.json") as f:
    assert f.read() == b'{"fake": true}'
  exported = export_hf(out, str(tmp_path / "export"), progress=False)
  assert os.path.exists(os.path.join(exported, "tokenizer.json"))
  from safetensors.numpy import load_file

  a, b = load_file(f"{hf_dir}/model.safetensors"), load_file(f"{exported}/model.safetensors")
  for k in b:
    np.testing.assert_array_equal(a[k], b[k])


def test_unfinished_write_is_cleared_and_finished_one_protected(gcs_bucket):
  cfg = ModelConfig(
    vocab_size=64, max_position_embeddings=16, num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32
  )
  params = init_params(cfg, jax.random.PRNGKey(0))
  path = f"{gcs_bucket}/killed"
  with fsspec.open(
    f"{path}/{PARAMS_DIR}/partial", "wb"
  ) as f:  # what a killed write leaves: no config
    f.write(b"x")
  with pytest.raises(FileNotFoundError, match="not a model checkpoint"):
    load_checkpoint(path)
  save_checkpoint(path, cfg, params)
  assert not _fs().exists(f"{path[5:]}/{PARAMS_DIR}/partial")
  cfg2, params2 = load_checkpoint(path)
  assert cfg2 == cfg
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(FileExistsError, match="already exists"):
    save_checkpoint(path, cfg, params)
