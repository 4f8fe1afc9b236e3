"""KV-cache decoding (model/decode.py) for every family against transformers' `generate`:
RoPE positions under left padding, sliding windows shorter than prompt + generation, GQA with
K = 2 kv heads, untied LM heads; on one device and sharded over a mesh; rows that end on any
of several EOS ids (Llama 3)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from model import load_checkpoint
from model.decode import Decoder, Request

# Left padding (rows of different lengths), and every row outgrows the window of 5: prompt +
# generation reaches 15..21 tokens.
PROMPT_LENS = (3, 9, 5, 7)
NEW = 12


def _prompts(seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(3, 97, n).tolist() for n in PROMPT_LENS]


def hf_greedy(model, prompts, new, eos=None) -> list[list[int]]:
  """transformers' greedy `generate` (fp32) over a left-padded batch; with `eos` (a list of ids)
  each row is cut after its first EOS (HF pads finished rows), without it no row stops early."""
  import torch
  from transformers import GenerationConfig

  p = max(map(len, prompts))
  ids = np.zeros((len(prompts), p), np.int64)
  mask = np.zeros_like(ids)
  for i, row in enumerate(prompts):
    ids[i, p - len(row) :], mask[i, p - len(row) :] = row, 1
  gen = GenerationConfig(
    do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=0, bos_token_id=1
  )
  with torch.no_grad():
    out = model.generate(
      torch.tensor(ids), attention_mask=torch.tensor(mask), generation_config=gen
    )
  rows = out[:, p:].numpy().tolist()
  if eos:
    rows = [next((r[: j + 1] for j, t in enumerate(r) if t in eos), r) for r in rows]
  return rows


def _no_eos(cfg):
  """fp32, and no EOS: rows run to max_new_tokens, as HF's generate without eos_token_id."""
  return cfg.replace(dtype="float32", eos_token_id=None, extra_eos_token_ids=(), pad_token_id=0)


def test_greedy_equals_transformers_generate(family_converted):
  case, model, _, ckpt = family_converted
  cfg, params = load_checkpoint(ckpt)
  dec = Decoder(_no_eos(cfg), params, chunk=4)  # chunks of 4: several loop calls per row
  gens = dec.generate(_prompts(), max_new_tokens=NEW)
  want = hf_greedy(model, _prompts(), NEW)
  assert [g.tokens for g in gens] == want, case
  assert all(g.finish_reason == "length" and len(g.tokens) == NEW for g in gens)
  assert [g.prompt_tokens for g in gens] == list(PROMPT_LENS)


# Three families that hold every switch between them: LayerNorm, GELU MLP, biases and a window
# (starcoder2); RMSNorm, gated MLP, q/k norm, head_dim != D / N, untied head (qwen3); a tied
# head and Llama 3's RoPE scaling (llama3).
@pytest.mark.parametrize("family_converted", ["starcoder2", "qwen3", "llama3"], indirect=True)
def test_sharded_greedy_equals_transformers_generate(family_converted):
  """Parameters sharded by the logical rules over fsdp=2 x tensor=2 (query heads and MLP over
  `tensor`, the 2 kv heads replicated, weights over `fsdp`), batch and cache over the batch
  axes: the same greedy tokens."""
  from model.sharding import LOGICAL_RULES, logical_to_sharding, make_mesh
  from model.transformer import abstract_params

  case, model, _, ckpt = family_converted
  cfg, _ = load_checkpoint(ckpt)
  cfg = _no_eos(cfg)
  mesh = make_mesh("fsdp=2,tensor=2", jax.devices()[:4])
  # The tables stay whole over `tensor`: a device_put cannot split the test vocabulary of 97
  # (real vocabularies divide); inside the jitted steps the logits keep their vocab constraint.
  rules = tuple((name, None if name == "vocab" else axes) for name, axes in LOGICAL_RULES)
  with nn.logical_axis_rules(rules):
    shardings = logical_to_sharding(abstract_params(cfg), mesh, rules)
  _, params = load_checkpoint(ckpt, shardings=shardings)
  assert len(params["wte"].sharding.device_set) == 4
  dec = Decoder(cfg, params, mesh=mesh, chunk=8)
  gens = dec.generate(_prompts(), max_new_tokens=NEW)
  assert [g.tokens for g in gens] == hf_greedy(model, _prompts(), NEW), case


@pytest.mark.parametrize("family_converted", ["llama3"], indirect=True)
def test_rows_end_on_any_eos_id(family_converted):
  """Llama 3 ends a turn on several ids: the checkpoint's config carries them all (2 and 5 here),
  and a row ends on whichever comes first, as HF's generate with the same list."""
  _, model, _, ckpt = family_converted
  cfg, params = load_checkpoint(ckpt)
  assert Decoder(cfg, params).eos_ids == (2, 5)
  # EOS ids the greedy rows do produce (the checkpoint's 2 and 5 may never come up): the 4th
  # token of row 0 as the main EOS, the 6th of row 2 as an extra one.
  free = hf_greedy(model, _prompts(), NEW)
  first, extra = free[0][3], free[2][5]
  assert first != extra
  eos = [first, extra]
  cfg = cfg.replace(dtype="float32", eos_token_id=first, extra_eos_token_ids=(extra,))
  dec = Decoder(cfg, params, chunk=4)
  assert dec.eos_ids == (first, extra)
  gens = dec.generate([Request(p, max_new_tokens=NEW) for p in _prompts()])
  want = hf_greedy(model, _prompts(), NEW, eos=eos)
  assert [g.tokens for g in gens] == want
  for g in gens:
    ended = g.tokens[-1] in eos
    assert g.finish_reason == ("stop" if ended else "length")
    assert ended or len(g.tokens) == NEW
    assert not any(t in eos for t in g.tokens[:-1])
  assert gens[0].tokens[-1] in eos and len(gens[0].tokens) <= 4
  assert any(g.tokens[-1] == extra for g in gens)  # the extra id ends a row too
