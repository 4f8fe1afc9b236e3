"""Our Flax GPTBigCode against transformers' GPTBigCodeForCausalLM, through `rrtf convert`."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_logits, make_hf_model, save_hf
from model import Transformer, load_checkpoint


def _inputs(left_pad: bool, t: int = 13, b: int = 3, seed: int = 0):
  tokens = np.random.RandomState(seed).randint(0, 97, (b, t))
  mask = np.ones((b, t), np.int64)
  if left_pad:
    mask[1, :4] = 0
    mask[2, : t - 1] = 0  # a single real token
  return tokens, mask


def _ours(ckpt, tokens, mask):
  cfg, params = load_checkpoint(ckpt)
  cfg = cfg.replace(dtype="float32")
  return np.asarray(
    Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask))
  )


@pytest.mark.parametrize("left_pad", [False, True], ids=["unpadded", "left_padded"])
def test_logits_match_transformers(converted, left_pad):
  model, _, ckpt = converted
  tokens, mask = _inputs(left_pad)  # T = 13: not a multiple of 8
  ref, ours = hf_logits(model, tokens, mask), _ours(ckpt, tokens, mask)
  real = mask.astype(bool)
  assert ours.shape == ref.shape == (3, 13, 97)
  assert np.abs(ours - ref)[real].max() <= 1e-4


def test_left_padding_does_not_change_real_token_logits(converted):
  _, _, ckpt = converted
  tokens, _ = _inputs(False, t=9, b=1)
  padded = np.concatenate([np.zeros((1, 5), tokens.dtype), tokens], axis=1)
  mask = np.concatenate([np.zeros((1, 5)), np.ones((1, 9))], axis=1).astype(np.int64)
  a = _ours(ckpt, tokens, np.ones_like(tokens))
  b = _ours(ckpt, padded, mask)[:, 5:]
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_convert_cli_sharded_bf16_checkpoint(tmp_path):
  """A checkpoint split over several safetensors files with an index, stored in bf16."""
  model = make_hf_model(True, seed=1)
  hf_dir = save_hf(model, tmp_path / "hf", max_shard_size="20KB")
  assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
  out = tmp_path / "ours"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "rrtf_jax.cli",
      "convert",
      "--hf-dir",
      hf_dir,
      "--out",
      str(out),
      "--dtype",
      "bfloat16",
    ],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr
  cfg, params = load_checkpoint(str(out))
  assert str(params["wte"].dtype) == "bfloat16"
  assert json.loads((out / "model_config.json").read_text())["num_kv_heads"] == 1
  tokens, mask = _inputs(True)
  ref = hf_logits(model, tokens, mask)
  ours = np.asarray(
    Transformer(cfg.replace(dtype="float32")).apply(
      {"params": params}, jnp.asarray(tokens), jnp.asarray(mask)
    )
  )
  # bf16 weights: only the rounding of the weights separates the two.
  assert np.abs(ours - ref)[mask.astype(bool)].max() < 5e-2


def test_bf16_compute_close_to_fp32(converted):
  _, _, ckpt = converted
  cfg, params = load_checkpoint(ckpt)
  tokens, mask = _inputs(True)
  f32 = Transformer(cfg.replace(dtype="float32")).apply({"params": params}, tokens, mask)
  b16 = Transformer(cfg.replace(dtype="bfloat16")).apply({"params": params}, tokens, mask)
  assert b16.dtype == jnp.float32  # logits stay fp32 under bf16 compute
  assert float(jnp.abs(f32 - b16)[mask.astype(bool)].max()) < 5e-2
