"""Every family through `rrtf convert` against transformers' own model class (fp32 logits within
1e-4: left padding, GQA with K > 1, sequences longer than the sliding window), and back through
`rrtf export` bit-exactly."""

import json
import os

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from conftest import FAMILY_CASES, hf_logits
from model import Transformer, load_checkpoint


def _inputs(t: int = 13, b: int = 3, seed: int = 0):
  tokens = np.random.RandomState(seed).randint(0, 97, (b, t))
  mask = np.ones((b, t), np.int64)
  mask[1, :4] = 0
  mask[2, : t - 1] = 0  # a single real token
  return tokens, mask


def _ours(ckpt, tokens, mask):
  cfg, params = load_checkpoint(ckpt)
  cfg = cfg.replace(dtype="float32")
  return np.asarray(
    Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask))
  )


def test_logits_match_transformers(family_converted):
  case, model, _, ckpt = family_converted
  tokens, mask = _inputs()
  ref, ours = hf_logits(model, tokens, mask), _ours(ckpt, tokens, mask)
  real = mask.astype(bool)
  assert ours.shape == ref.shape == (3, 13, 97)
  err = np.abs(ours - ref)[real].max()
  print(f"{case}: max |ours - HF| = {err:.2e}")
  assert err <= 1e-4
  # the switch that makes the case is exercised: without it the logits are far off
  cfg, params = load_checkpoint(ckpt)
  off = {"sliding_window": None} if cfg.sliding_window else {}
  if cfg.rope_scaling != "none":
    off["rope_scaling"] = "none"
  if off:
    wrong = Transformer(cfg.replace(dtype="float32", **off)).apply({"params": params}, tokens, mask)
    assert np.abs(np.asarray(wrong) - ref)[real].max() > 1e-3, off


def test_config_carries_the_family(family_converted):
  case, model, _, ckpt = family_converted
  cfg, params = load_checkpoint(ckpt)
  hf = model.config
  assert cfg.family == hf.model_type
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
    hf.num_attention_heads,
    hf.num_key_value_heads,
    getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
  )
  assert cfg.sliding_window == FAMILY_CASES[case][1].get("sliding_window")
  assert ("lm_head" in params) == (not hf.tie_word_embeddings)
  assert "wpe" not in params
  if case == "llama3":
    assert cfg.rope_scaling == "llama3" and cfg.eos_ids == (2, 5)


def test_export_is_bit_exact_and_transformers_loads_it(family_converted, tmp_path):
  import transformers

  from model.convert import convert_hf, export_hf

  case, model, hf_dir, ckpt = family_converted
  out = export_hf(ckpt, str(tmp_path / "export"), progress=False)
  original, exported = (
    load_file(f"{hf_dir}/model.safetensors"),
    load_file(f"{out}/model.safetensors"),
  )
  if model.config.tie_word_embeddings:
    original.pop("lm_head.weight", None)
  assert sorted(original) == sorted(exported)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  with open(os.path.join(out, "config.json")) as f:
    hf_cfg = json.load(f)
  reloaded = getattr(transformers, hf_cfg["architectures"][0]).from_pretrained(
    out, attn_implementation="eager"
  )
  assert type(reloaded) is type(model)
  tokens, mask = _inputs(seed=1)
  np.testing.assert_array_equal(
    hf_logits(reloaded.eval(), tokens, mask), hf_logits(model, tokens, mask)
  )
  # convert -> export -> convert: the same checkpoint again
  again = convert_hf(out, str(tmp_path / "again"), progress=False)
  cfg_a, params_a = load_checkpoint(ckpt)
  cfg_b, params_b = load_checkpoint(again)
  assert cfg_a == cfg_b
  import jax

  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
