"""Weight-only quantization (model/quantize.py, `rrtf quantize`): error bounds of each method, GPTQ
against qwix's reference steps and against round-to-nearest, a quantized tiny model's logits,
and quantized checkpoints through save/load, evaluate, sample and serve."""

import json
import subprocess
import sys
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cli_runs_in_one_process, dequantized_params
from model.quantize import hessian, output_error, quantize_gptq, quantize_rtn


def _kernel(d_in=128, d_out=96, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((d_in, d_out)) * rng.uniform(0.01, 0.1, (1, d_out))).astype(
    np.float32
  )


@pytest.mark.parametrize("bits,group,bound", [(8, None, 0.01), (4, 32, 0.12), (4, 128, 0.15)])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group, bound):
  w = _kernel()
  qw = quantize_rtn(w, bits, group)
  assert (
    qw.q.dtype == np.int8 and qw.q.min() >= -(2 ** (bits - 1)) and qw.q.max() <= 2 ** (bits - 1) - 1
  )
  g = w.shape[0] // (group or w.shape[0])
  assert qw.scale.shape == (g, w.shape[1])
  step = np.repeat(qw.scale, w.shape[0] // g, axis=0)
  err = np.abs(w - qw.dequantize())
  assert np.all(err <= step / 2 + 1e-7)
  # Relative error of a Gaussian kernel: about (max |w| / qmax) / sqrt(12) / std, i.e. ~0.8% for
  # int8 per channel, ~10% for int4 in groups of 32.
  rel = np.linalg.norm(w - qw.dequantize()) / np.linalg.norm(w)
  assert rel < bound, rel


def test_zero_columns_and_bad_shapes():
  w = _kernel()
  w[:, 3] = 0
  assert np.all(quantize_rtn(w, 4, 32).dequantize()[:, 3] == 0)
  with pytest.raises(ValueError, match="does not divide"):
    quantize_rtn(w, 4, 48)
  with pytest.raises(ValueError, match=r"\[D_in, D_out\]"):
    quantize_rtn(w[None], 8)
  with pytest.raises(ValueError, match=r"Hessian must be \[128, 128\]"):
    quantize_gptq(w, np.eye(64))


def _correlated(n, d, rng, sets=1):
  """`sets` input sets [n, d] drawn from one distribution with correlated features."""
  mix = rng.standard_normal((d, d)) * np.exp(-np.arange(d) / 16)[None, :]
  out = [rng.standard_normal((n, d)) @ mix.T for _ in range(sets)]
  return out if sets > 1 else out[0]


@pytest.mark.parametrize("bits,group", [(4, 32), (4, None), (8, None)])
def test_gptq_beats_round_to_nearest_on_calibration_loss(bits, group):
  """Correlated inputs (what activations are): GPTQ's output error is well below RTN's, on the
  calibration set and on held-out inputs from the same distribution."""
  rng = np.random.default_rng(1)
  w = _kernel(seed=2)
  calib, held = _correlated(512, 128, rng, sets=2)
  rtn, gptq = quantize_rtn(w, bits, group), quantize_gptq(w, hessian(calib), bits, group)
  assert gptq.q.dtype == np.int8 and gptq.scale.shape == rtn.scale.shape  # same format
  assert output_error(w, gptq, calib) < 0.3 * output_error(w, rtn, calib)
  assert output_error(w, gptq, held) < 0.3 * output_error(w, rtn, held)  # measured: 0.11-0.13


def test_gptq_equals_qwix_reference(group=8):
  """Our lax.fori_loop GPTQ takes exactly the steps of qwix's gptq_core.quantize_weight (blocks of
  16 columns here, so error spreading across blocks and group scales are compared too)."""
  from qwix._src.core import qarray
  from qwix.contrib import gptq_core

  rng = np.random.default_rng(4)
  w = _kernel(48, 24, seed=5)
  h = hessian(_correlated(256, 48, rng))
  ours = quantize_gptq(w, h, 4, group, blocksize=16)
  how = qarray.HowToQuantize(
    qtype=jnp.int4, channelwise_axes=(0,), tiled_axes={1: group} if group else {}
  )
  ref, _ = jax.jit(lambda w, h: gptq_core.quantize_weight(w, h, how, blocksize=16))(
    jnp.asarray(w.T), jnp.asarray(h)
  )
  np.testing.assert_array_equal(ours.q, np.asarray(ref.qvalue).astype(np.int8).T)
  np.testing.assert_allclose(ours.scale, np.asarray(ref.scale).T, rtol=1e-6)


def test_gptq_with_an_input_never_active():
  rng = np.random.default_rng(3)
  w = _kernel(64, 32)
  x = rng.standard_normal((256, 64))
  x[:, 5] = 0
  qw = quantize_gptq(w, hessian(x), 4, 16)
  assert np.isfinite(qw.dequantize()).all()
  assert output_error(w, qw, x) <= output_error(w, quantize_rtn(w, 4, 16), x)


# ---- a whole model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peaked_tiny():
  """configs/tiny.py with random weights scaled up (kernels and embedding x6) so its next-token
  distributions are far from uniform, and random calibration / evaluation tokens."""
  from model import ModelConfig, init_params
  from rrtf_jax.config_loading import load_config

  cfg = ModelConfig.from_dict(load_config("tiny").model)
  params = jax.tree_util.tree_map_with_path(
    lambda p, a: a * 6 if any(k in jax.tree_util.keystr(p) for k in ("kernel", "wte")) else a,
    init_params(cfg, jax.random.PRNGKey(0)),
  )
  rng = np.random.default_rng(0)
  calib = rng.integers(4, cfg.vocab_size, (32, 64))
  mask = np.ones_like(calib)
  mask[::2, 40:] = 0  # padding is left out of the Hessians
  return cfg, params, (calib, mask), jnp.asarray(rng.integers(4, cfg.vocab_size, (8, 64)))


def test_quantized_tiny_model_stays_close(peaked_tiny):
  """KL(original || quantized) of next-token distributions on held-out tokens stays small; GPTQ
  has the lower calibration loss and the lower KL; the parameters match the quantized config's
  abstract tree; and the model's own dequantizing matmuls equal the float model run on the
  dequantized kernels."""
  import flax.linen as nn

  from model.quantize import quantize_params
  from model.transformer import Transformer, abstract_params

  cfg, params, calibration, tokens = peaked_tiny
  ref = jax.nn.log_softmax(Transformer(cfg).apply({"params": params}, tokens))
  entropy = float(-(jnp.exp(ref) * ref).sum(-1).mean())
  assert entropy < 0.95 * np.log(cfg.vocab_size)  # the scaled model is not uniform
  kl, reports = {}, {}
  for method, embedding in [("int8", True), ("int4-rtn", False), ("int4-gptq", False)]:
    qcfg, qp, reports[method] = quantize_params(
      cfg, params, method, group=32, embedding=embedding, dtype="float32", calibration=calibration
    )
    want = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), nn.unbox(abstract_params(qcfg)))
    assert jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), qp) == want
    logq = jax.nn.log_softmax(Transformer(qcfg).apply({"params": qp}, tokens))
    kl[method] = float((jnp.exp(ref) * (ref - logq)).sum(-1).mean())
    if (
      method == "int4-rtn"
    ):  # the quantized forward pass == the float one on the dequantized kernels
      deq = dequantized_params(cfg, params, qp, 4)
      np.testing.assert_allclose(
        Transformer(cfg).apply({"params": deq}, tokens),
        Transformer(qcfg).apply({"params": qp}, tokens),
        rtol=2e-4,
        atol=2e-4,
      )
  # measured: int8 (and an int8 embedding) 1.4e-4, int4 RTN 0.024, int4 GPTQ 0.016
  assert kl["int8"] < 1e-3 and kl["int4-rtn"] < 0.05 and kl["int4-gptq"] < kl["int4-rtn"], kl
  gptq = reports["int4-gptq"]
  assert gptq["calibration_error"] < 0.7 * gptq["rtn_calibration_error"], gptq  # measured 0.51
  assert (
    len(gptq["kernels"]) == 5 * cfg.num_layers
    and gptq["calibration_tokens"] == calibration[1].sum()
  )
  assert reports["int4-rtn"]["calibration_error"] == pytest.approx(
    reports["int4-rtn"]["rtn_calibration_error"]
  )


def test_quantized_checkpoints_round_trip_and_load_in_evaluate_sample_serve(tiny_ckpt, tmp_path):
  """`rrtf quantize` writes checkpoints that load back bit for bit (int4 stays int4), decode like
  the in-memory model (sharded over a mesh too), and run in `rrtf evaluate`, `rrtf sample` and
  `rrtf serve`; bad input gets one line."""
  from data import synthetic
  from rrtf_jax.stages.quantize import quantize_stage

  problems = tmp_path / "problems.jsonl"
  problems.write_text("".join(json.dumps(r) + "\n" for r in synthetic.splits(0, 4, 4, 4)["train"]))
  q4, q8 = str(tmp_path / "q4"), str(tmp_path / "q8")
  # rrtf serve on an int8 checkpoint (int8 embedding too) starts while the commands below run.
  summary = quantize_stage(tiny_ckpt, "int8", q8, embedding=True, progress=False)
  # fp32 -> int8, and bf16 positions and biases
  assert summary.bytes_after < 0.35 * summary.bytes_before
  serve = subprocess.Popen(
    [sys.executable, "-m", "rrtf_jax.cli", "serve", "--ckpt", q8, "--port", "0", "--chunk", "4"],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    _quantize_cli_and_stages(tiny_ckpt, problems, q4, q8, tmp_path)
    line = serve.stdout.readline()
    assert line.startswith("serving"), line
    req = urllib.request.Request(
      line.split(" on ")[1].strip() + "/completions",
      method="POST",
      data=json.dumps({"prompt": "def f():", "max_tokens": 4}).encode(),
      headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
      body = json.loads(r.read())
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["finish_reason"] in (
      "stop",
      "length",
    )
  finally:
    serve.terminate()
    serve.wait(timeout=30)


def _quantize_cli_and_stages(tiny_ckpt, problems, q4, q8, tmp_path):
  from data.tokenizer import resolve_tokenizer
  from model import load_checkpoint
  from model.checkpoint import read_config, tokenizer_path
  from model.decode import Decoder
  from model.quantize import quantize_params
  from rrtf_jax.stages.quantize import calibration_tokens

  runs = cli_runs_in_one_process(
    [
      [
        "quantize",
        "--ckpt",
        tiny_ckpt,
        "--method",
        "int4-gptq",
        "--calibration",
        str(problems),
        "--group",
        "32",
        "--out",
        q4,
        "--quiet",
      ],
      ["quantize", "--ckpt", q4, "--method", "int8", "--out", str(tmp_path / "x")],
      ["quantize", "--ckpt", tiny_ckpt, "--method", "int4-gptq", "--out", str(tmp_path / "x")],
      [
        "quantize",
        "--ckpt",
        tiny_ckpt,
        "--method",
        "int4-rtn",
        "--group",
        "48",
        "--out",
        str(tmp_path / "x"),
      ],
      ["quantize", "--ckpt", tiny_ckpt, "--method", "int8", "--out", q4],
      [
        "quantize",
        "--ckpt",
        str(tmp_path / "nope"),
        "--method",
        "int8",
        "--out",
        str(tmp_path / "x"),
      ],
      ["export", "--ckpt", q4, "--out", str(tmp_path / "hf")],
      [
        "evaluate",
        "--ckpt",
        q4,
        "--problems",
        str(problems),
        "--out",
        str(tmp_path / "eval"),
        "--greedy",
        "--max-new-tokens",
        "8",
        "--quiet",
      ],
      [
        "sample",
        "--ckpt",
        q8,
        "--problems",
        str(problems),
        "--out",
        str(tmp_path / "samples"),
        "--num-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--quiet",
      ],
    ],
    cwd=str(tmp_path),
  )
  assert [c for c, _ in runs] == [0, 2, 2, 2, 2, 2, 2, 0, 0], runs
  errors = [e.strip().splitlines()[-1] for _, e in runs[1:7]]
  assert errors == [
    f"rrtf quantize: error: {q4}: quantized already; quantize the full-precision checkpoint",
    "rrtf quantize: error: int4-gptq needs calibration prompts: --calibration FILE "
    "(problems JSONL, e.g. the training problems)",
    "rrtf quantize: error: model.quant_group=48 does not divide a kernel's 64 input rows",
    f"rrtf quantize: error: {q4}: output already exists",
    f"rrtf quantize: error: {tmp_path / 'nope'}: not a model checkpoint (no model_config.json)",
    f"rrtf export: error: {q4}: a quantized checkpoint has no HF form here; export the "
    "full-precision one it was quantized from",
  ]
  assert not (tmp_path / "x").exists() and not (tmp_path / "hf").exists()
  assert json.loads((tmp_path / "eval" / "summary.json").read_text())["problems"] == 4
  assert list((tmp_path / "samples").glob("*.tfrecord*"))

  # Round trip: what the CLI saved is what quantize_params makes in memory.
  cfg, params = load_checkpoint(tiny_ckpt)
  calib = calibration_tokens(
    str(problems), resolve_tokenizer(tokenizer_path(tiny_ckpt)), max_prompts=128, seq_len=512
  )
  qcfg, qparams, _ = quantize_params(cfg, params, "int4-gptq", group=32, calibration=calib)
  assert read_config(q4) == qcfg and qcfg.quant_bits == 4 and qcfg.param_dtype == "bfloat16"
  loaded_cfg, loaded = load_checkpoint(q4)
  assert jax.tree.structure(loaded) == jax.tree.structure(qparams)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(qparams)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(
      np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32)
    )
  assert loaded["h"]["mlp"]["fc_kernel"].dtype == jnp.int4
  record = json.loads((tmp_path / "q4" / "quantization.json").read_text())
  assert record["method"] == "int4-gptq" and record["calibration_prompts"] == 4
  assert record["calibration_error"] < record["rtn_calibration_error"]
  prompts = ["def add(a, b):\n", "x = 1\n"]
  from_disk = Decoder.from_checkpoint(q4, chunk=4).generate(prompts, max_new_tokens=8)
  in_memory = Decoder(
    qcfg, qparams, resolve_tokenizer(tokenizer_path(tiny_ckpt)), chunk=4
  ).generate(prompts, max_new_tokens=8)
  assert [g.tokens for g in from_disk] == [g.tokens for g in in_memory]
  from model.sharding import make_mesh  # sharded over 4 of the 8 fake devices, as `--mesh` does

  sharded = Decoder.from_checkpoint(
    q4, mesh=make_mesh("fsdp=2,tensor=2", jax.devices()[:4]), chunk=4
  )
  assert [g.tokens for g in sharded.generate(prompts, max_new_tokens=8)] == [
    g.tokens for g in from_disk
  ]
