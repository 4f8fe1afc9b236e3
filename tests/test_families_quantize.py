"""Weight-only quantization (model/quantize.py, `rrtf quantize`) of the model families: GPTQ's
calibration runs each family's own layers (RoPE, RMSNorm, q/k norm, sliding window, no `wpe`), and
for qwen3 (gated MLP, untied LM head, q/k norm, head_dim != D / N) and starcoder2 (GELU MLP, tied
head) int8 and int4 (RTN, GPTQ) stay close to the float model, `--embedding int8` quantizes an
untied lm_head too, the checkpoints decode, and their export is refused in one line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cli_runs_in_one_process, dequantized_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["qwen3", "starcoder2"]  # gated + untied head + q/k norm; GELU + tied


def _peaked(params):
  """Kernels and the embedding / LM head tables x6 (as test_quantize.py's peaked_tiny): next-token
  distributions far from uniform, so quantization errors show in the KL."""
  return jax.tree_util.tree_map_with_path(
    lambda p, a: (
      a * 6 if any(k in jax.tree_util.keystr(p) for k in ("kernel", "wte", "lm_head")) else a
    ),
    params,
  )


def _log_probs(cfg, params, tokens):
  from model import Transformer

  return jax.nn.log_softmax(
    Transformer(cfg.replace(dtype="float32")).apply({"params": params}, jnp.asarray(tokens))
  )


def _kl(ref, logq) -> float:
  return float((jnp.exp(ref) * (ref - logq)).sum(-1).mean())


def test_calibration_runs_the_family_model(family_converted):
  """The calibration pass (embedding, then the model's Block layer by layer with the positions the
  model derives from the mask) reproduces the model's own hidden states, left and right padding
  included: with RoPE there is no `wpe`, the positions act inside attention."""
  from model import Transformer, load_checkpoint
  from model.quantize import _Calibration
  from model.transformer import _norm

  case, _, _, ckpt = family_converted
  cfg, params = load_checkpoint(ckpt)
  cfg = cfg.replace(dtype="float32")
  tokens = np.random.RandomState(0).randint(0, 97, (3, 13))
  mask = np.ones_like(tokens)
  mask[1, 9:] = 0  # right padding (what calibration_tokens makes)
  mask[2, :4] = 0  # left padding
  calib = _Calibration(cfg, params, tokens, mask)
  for i in range(cfg.num_layers):
    calib.advance(jax.tree.map(lambda a: a[i], params["h"]))
  [(x, _, _)] = calib.batches
  ours = _norm(cfg, "ln_f").apply({"params": params["ln_f"]}, x)
  ref = Transformer(cfg).apply(
    {"params": params}, jnp.asarray(tokens), jnp.asarray(mask), return_hidden=True
  )
  real = mask.astype(bool)
  err = float(np.abs(np.asarray(ours) - np.asarray(ref))[real].max())
  assert err <= 1e-5, (case, err)
  with pytest.raises(ValueError, match=r"calibration token ids must be in \[0, 97\)"):
    _Calibration(cfg, params, tokens + 97, mask)


@pytest.mark.parametrize("family_converted", CASES, indirect=True)
def test_quantized_family_model_stays_close(family_converted):
  """In memory, groups of 32: KL(float || quantized) of next-token distributions on held-out
  tokens is small (these D=32 models have one group per channel: int8 with an int8 embedding
  and head under 1/20 of int4 RTN's, int4 RTN < 0.5 nats, GPTQ below RTN on the KL and the
  calibration loss; measured int8 8e-4 to 1.3e-3, RTN 0.13 to 0.25, GPTQ 0.10 to 0.18), the
  parameters are the quantized config's tree (the gated
  MLP's gate/up kernels quantized, an untied lm_head int8 with row scales), and the dequantizing
  forward pass equals the float model on the dequantized kernels."""
  import flax.linen as nn

  from model import Transformer, abstract_params, load_checkpoint
  from model.quantize import kernels, quantize_params

  case, _, _, ckpt = family_converted
  cfg, params = load_checkpoint(ckpt)
  cfg, params = cfg.replace(dtype="float32"), _peaked(params)
  rng = np.random.default_rng(0)
  calib = rng.integers(4, cfg.vocab_size, (32, 48))
  calib_mask = np.ones_like(calib)
  calib_mask[::2, 30:] = 0
  tokens = rng.integers(4, cfg.vocab_size, (8, 48))
  ref = _log_probs(cfg, params, tokens)
  entropy = float(-(jnp.exp(ref) * ref).sum(-1).mean())
  assert entropy < 0.95 * np.log(cfg.vocab_size), entropy
  table = kernels(cfg)
  assert {p[1] for p, _, _ in table} == (
    {"q_kernel", "kv_kernel", "o_kernel", "proj_kernel"}
    | ({"gate_kernel", "up_kernel"} if cfg.mlp == "gated" else {"fc_kernel"})
  )
  kl, reports = {}, {}
  for method, embedding in [("int8", True), ("int4-rtn", False), ("int4-gptq", False)]:
    qcfg, qp, reports[method] = quantize_params(
      cfg,
      params,
      method,
      group=32,
      embedding=embedding,
      dtype="float32",
      calibration=(calib, calib_mask),
    )
    want = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), nn.unbox(abstract_params(qcfg)))
    assert jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), qp) == want
    heads = [n for n in ("wte", "lm_head") if n in params]
    assert heads == (["wte"] if cfg.tie_embeddings else ["wte", "lm_head"])
    for name in heads:  # int8 rows with a scale each, or kept in --dtype
      assert qp[name].dtype == (jnp.int8 if embedding else jnp.float32)
      assert (f"{name}_scale" in qp) == embedding
    kl[method] = _kl(ref, _log_probs(qcfg, qp, tokens))
    if method == "int4-rtn":  # the quantized forward pass == the float one, dequantized kernels
      deq = dequantized_params(cfg, params, qp, 4)
      np.testing.assert_allclose(
        Transformer(cfg).apply({"params": deq}, tokens),
        Transformer(qcfg.replace(dtype="float32")).apply({"params": qp}, tokens),
        rtol=2e-4,
        atol=2e-4,
      )
  print(case, kl, {m: r["calibration_error"] for m, r in reports.items()})
  assert kl["int8"] < 0.05 * kl["int4-rtn"] and kl["int4-rtn"] < 0.5, kl
  assert kl["int4-gptq"] < kl["int4-rtn"], kl
  gptq = reports["int4-gptq"]
  assert gptq["calibration_error"] < 0.7 * gptq["rtn_calibration_error"], gptq
  assert len(gptq["kernels"]) == len(table) * cfg.num_layers
  assert gptq["calibration_tokens"] == calib_mask.sum()


@pytest.fixture(scope="module")
def family_ckpts(family_tokenizer, tmp_path_factory):
  """Peaked qwen3 and starcoder2 checkpoints with the 96-piece tokenizer (GPTQ's --calibration
  needs one), and a problems JSONL."""
  from conftest import make_family_model, save_hf
  from data import synthetic
  from model import load_checkpoint, save_checkpoint
  from model.convert import convert_hf

  root = tmp_path_factory.mktemp("family-quantize")
  out = {}
  for case in CASES:
    hf_dir = save_hf(make_family_model(case), root / case / "hf")
    cfg, params = load_checkpoint(convert_hf(hf_dir, str(root / case / "ckpt"), progress=False))
    out[case] = save_checkpoint(
      str(root / case / "peaked"), cfg, _peaked(params), tokenizer_dir=family_tokenizer
    )
  problems = root / "problems.jsonl"
  problems.write_text("".join(json.dumps(r) + "\n" for r in synthetic.splits(0, 4, 16, 4)["train"]))
  return root, out, str(problems)


def test_rrtf_quantize_families(family_ckpts):
  """`rrtf quantize` (one process for both families): int8 with `--embedding int8`, int4 RTN and
  GPTQ (groups of 32, calibrated on problem prompts); the checkpoints load, stay close to the
  float model, quantize lm_head with the embedding (else keep it in --dtype), decode greedily
  (starcoder2: the tokens the quantized model's own argmax gives), and `rrtf export` refuses them
  in one line."""
  from model import load_checkpoint
  from model.decode import Decoder
  from model.transformer import Transformer

  root, ckpts, problems = family_ckpts
  argvs, expect = [], []
  for case, ckpt in ckpts.items():
    for method, extra in [
      ("int8", ["--embedding", "int8"]),
      ("int4-rtn", ["--group", "32", "--calibration", problems]),
      ("int4-gptq", ["--group", "32", "--calibration", problems]),
    ]:
      argvs.append(
        [
          "quantize",
          "--ckpt",
          ckpt,
          "--method",
          method,
          "--out",
          str(root / case / method),
          "--quiet",
          *extra,
        ]
      )
      expect.append(0)
    argvs.append(
      ["export", "--ckpt", str(root / case / "int8"), "--out", str(root / case / "hf-q")]
    )
    expect.append(2)
  runs = cli_runs_in_one_process(argvs, cwd=ROOT)
  assert [c for c, _ in runs] == expect, runs
  tokens = np.random.default_rng(1).integers(4, 97, (8, 48))
  for case, ckpt in ckpts.items():
    err = runs[4 * CASES.index(case) + 3][1].strip().splitlines()
    assert err == [
      f"rrtf export: error: {root / case / 'int8'}: a quantized checkpoint has no HF form here; "
      "export the full-precision one it was quantized from"
    ], err
    assert not (root / case / "hf-q").exists()
    cfg, params = load_checkpoint(ckpt)
    ref = _log_probs(cfg, params, tokens)
    kl = {}
    for method in ("int8", "int4-rtn", "int4-gptq"):
      qcfg, qp = load_checkpoint(str(root / case / method))
      assert qcfg.quant_bits == (8 if method == "int8" else 4)
      kl[method] = _kl(ref, _log_probs(qcfg, qp, tokens))
      embedding = method == "int8"
      assert qcfg.quant_embedding == embedding
      for name in ("wte",) + (() if cfg.tie_embeddings else ("lm_head",)):
        assert qp[name].dtype == (jnp.int8 if embedding else jnp.bfloat16), (case, method, name)
      assert ("lm_head" in qp) == (not cfg.tie_embeddings)
    record = json.loads((root / case / "int4-gptq" / "quantization.json").read_text())
    print(case, kl, record["calibration_error"], record["rtn_calibration_error"])
    # calibrated on problem prompts, measured on random ids: GPTQ wins on its calibration loss
    # (below), not necessarily on this KL (qwen3: RTN 0.27, GPTQ 0.30; int8 1.9e-3)
    assert kl["int8"] < 0.05 * kl["int4-rtn"] and max(kl.values()) < 0.5, (case, kl)
    assert record["calibration_prompts"] == 16
    assert record["calibration_error"] < 0.7 * record["rtn_calibration_error"], record

    # Greedy decoding of the GPTQ checkpoint, from token ids.
    q4 = str(root / case / "int4-gptq")
    prompts = [[5, 17, 30, 8, 41], [9, 60, 22]]
    gens = Decoder.from_checkpoint(q4, dtype="float32", chunk=4).generate(prompts, max_new_tokens=6)
    for g in gens:
      assert 1 <= len(g.tokens) <= 6 and all(0 <= t < 97 for t in g.tokens)
    if cfg.tie_embeddings:  # each greedy token is the argmax of the model on what precedes it
      qcfg, qp = load_checkpoint(q4)
      model = Transformer(qcfg.replace(dtype="float32"))
      for p, g in zip(prompts, gens):
        seq = p + g.tokens
        logits = np.asarray(model.apply({"params": qp}, jnp.asarray([seq[:-1]])))[0]
        assert list(logits[len(p) - 1 :].argmax(-1)) == g.tokens, (case, g.tokens)
