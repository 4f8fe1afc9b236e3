"""`rrtf plan`: real libtpu ahead-of-time compilation for a TPU topology on this CPU machine."""

import json
import subprocess
import sys

import pytest

from conftest import cli_runs_in_one_process
from rrtf_jax.config_loading import load_config
from rrtf_jax.plan import PlanError, plan


def test_tiny_on_v5e_2x2():
  result = plan(load_config("tiny"), "v5e:2x2")
  assert result.device_kind == "TPU v5 lite" and result.num_devices == 4
  assert result.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  assert result.hbm_bytes == 16 << 30 and result.fits
  # The state (fp32 parameters and AdamW's two moments) is split over fsdp=4: a device holds more
  # than a quarter of its bytes (TPU tiles pad small dims, and a few biases replicate) but far
  # less than all of them; the donated state comes back in place.
  state_bytes = result.params * 4 * 3
  assert state_bytes / 4 <= result.argument_bytes < state_bytes * 0.75
  assert result.alias_bytes >= state_bytes / 4
  assert result.responses == 4 and result.microbatches == 1
  assert result.flops_per_step > 0 and "verdict      fits" in result.report()
  assert result.attention == "pallas"  # auto: our Pallas kernel on TPU


def test_cli_reports_and_writes_json(tmp_path):
  out = tmp_path / "plan.json"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "rrtf_jax.cli",
      "plan",
      "--config",
      "configs/tiny.py",
      "--topology",
      "v5e:2x2",
      "--mesh",
      "fsdp=2,tensor=2",
      "--config.model.num_layers=3",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    cwd=_root(),
  )
  assert proc.returncode == 0, proc.stderr
  assert "mesh data=1,fsdp=2,tensor=2" in proc.stdout and "fits" in proc.stdout
  assert "attention: pallas" in proc.stdout
  assert json.loads(out.read_text())["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}


def test_does_not_fit_verdict():
  """XLA attention's [N, T, T] scores at 8192 tokens exceed a v5e chip: the compiler itself
  refuses."""
  result = plan(
    load_config(
      "starcoder_15b",
      [
        "--config.model.num_layers=2",
        "--config.model.attention=xla",
        "--config.train.microbatches=1",
      ],
    ),
    "v5e:2x2",
    batch_size=4,
    seq_len=8192,
  )
  assert result.fits is False
  assert "DOES NOT FIT" in result.report()


# A tiny Llama/StarCoder2-style model: RoPE, 2 kv heads for 4 query heads (GQA), RMSNorm, gated
# SiLU MLP, an untied LM head and a sliding window shorter than the sequence (our Pallas kernel's
# window on TPU).
TINY_GQA = [
  "--config.model.family=llama",
  "--config.model.position_embedding=rope",
  "--config.model.num_kv_heads=2",
  "--config.model.norm=rmsnorm",
  "--config.model.mlp=gated",
  "--config.model.activation=silu",
  "--config.model.tie_embeddings=false",
  "--config.model.sliding_window=64",
]


def test_rope_gqa_untied_windowed_train_and_decode_plans():
  from model.transformer import count_params
  from rrtf_jax.plan import ModelConfig, describe_model, plan_decode, train_flops

  config = load_config("tiny", TINY_GQA)
  cfg = ModelConfig.from_dict(config.model)
  result = plan(config, "v5e:2x2", mesh_spec="fsdp=2,tensor=2")
  assert result.fits and result.attention == "pallas"
  assert result.params == count_params(cfg)  # the untied lm_head [V, D] counted
  assert result.params > 2 * cfg.vocab_size * cfg.embed_dim
  assert result.model == describe_model(cfg)
  assert "4 heads / 2 kv (GQA) of 16" in result.report() and "untied head, window 64" in (
    result.report()
  )
  # FLOPs: q, k, v (2 kv heads), o, three gated-MLP kernels, the head; 64 keys per query.
  d, h, f, v, t, layers = 64, 16, 256, 1024, 256, 2
  per_token = layers * 2 * (d * 4 * h + d * 2 * 2 * h + 4 * h * d + 3 * d * f) + 2 * d * v
  sequences = 8 * 4
  expected = 3.0 * sequences * (t * per_token + layers * 4 * t * 64 * 4 * h)
  assert result.flops_per_step == train_flops(cfg, sequences, t) == expected

  dec = plan_decode(config, "v5e:2x2", mesh_spec="fsdp=4", batch_size=4, context=512)
  # K and V of every layer, 2 kv heads of 16, in tiny's compute dtype (float32)
  assert dec.fits and dec.cache_bytes_per_token == 2 * layers * 2 * h * 4
  assert dec.cache_bytes == dec.cache_bytes_per_token * 4 * 512
  assert "per token" in dec.report()


def test_decode_plan_bytes_per_step_and_bandwidth_bound():
  """A decode step reads its arguments once (the weights as sharded, the whole KV cache, the
  decode state) and the rest of each fsdp-sharded weight, which XLA gathers: tokens/s <= batch x
  HBM bandwidth / those bytes. Quantized weights read less."""
  from rrtf_jax.plan import HBM_BANDWIDTH_PER_CHIP, plan_decode

  config = load_config("tiny", ["--config.model.dtype=bfloat16"])
  plans = {
    q: plan_decode(
      config, "v5e:2x2", mesh_spec="fsdp=4", batch_size=4, context=512, quant=q, group=g
    )
    for q, g in (("none", None), ("int8", None), ("int4", 32))
  }
  bf16 = plans["none"]
  assert bf16.weights == "bfloat16" and bf16.hbm_bandwidth == HBM_BANDWIDTH_PER_CHIP["TPU v5 lite"]
  assert bf16.hbm_bandwidth == 819e9
  # By hand: K and V of 2 layers, one row per device (batch 4 over fsdp=4), 512 tokens, one kv
  # head of 16, bf16.
  assert bf16.cache_bytes_per_device == 2 * 2 * 1 * 512 * 1 * 16 * 2 == 65536
  for p in plans.values():
    assert p.fits and p.argument_bytes >= p.weight_bytes_per_device + p.cache_bytes_per_device
    assert p.param_bytes / 4 <= p.weight_bytes_per_device < p.param_bytes  # fsdp=4, some replicate
    # fsdp gathers every weight: a device reads all of them (no tensor axis divides them)
    assert p.weight_read_bytes_per_device == p.param_bytes
    step = p.argument_bytes + p.param_bytes - p.weight_bytes_per_device
    assert p.step_bytes == step
    assert p.step_seconds_bound == pytest.approx(step / 819e9)
    assert p.tokens_per_second_bound == pytest.approx(4 * 819e9 / step)
    d = p.to_dict()
    assert d["step_bytes"] == step
    assert d["tokens_per_second_bound"] == pytest.approx(p.tokens_per_second_bound)
    assert "tokens/s for the topology" in p.report() and "at 819 GB/s HBM" in p.report()
    assert "gathered over fsdp" in p.report()
  int8, int4 = plans["int8"], plans["int4"]
  assert int4.weight_bytes_per_device < int8.weight_bytes_per_device < bf16.weight_bytes_per_device
  assert int4.step_bytes < int8.step_bytes < bf16.step_bytes
  assert bf16.tokens_per_second_bound < int8.tokens_per_second_bound < int4.tokens_per_second_bound


BAD_INPUTS = [
  (["--topology", "v9z:2x2"], "unknown or unsupported topology 'v9z:2x2'"),
  (["--topology", "v5e:2x2", "--mesh", "fsdp=3"], "has 3 devices, but there are 4"),
  (["--topology", "v5e:2x2", "--mesh", "tensor=3,fsdp=-1"], "does not divide 4 devices"),
  (["--topology", "v5e:2x2", "--batch-size", "6"], "micro-batch of 6 prompts"),
  (
    ["--topology", "v5e:2x2", "--config.train.microbatches=3"],
    "not a multiple of train.microbatches=3",
  ),
  (["--topology", "v5e:2x2", "--config.model.num_layerz=1"], "no field 'model.num_layerz'"),
  (["--topology", "v5e:2x2", "--quant", "int8"], "plan the decode step: add --decode"),
  (
    ["--topology", "v5e:1x1", "--decode", "--seq-len", "600"],
    "be at most model.max_position_embeddings=512",
  ),
  (
    ["--topology", "v5e:1x1", "--decode", "--quant", "int4", "--quant-group", "48"],
    "model.quant_group=48 does not divide a kernel's 64 input rows",
  ),
]


@pytest.fixture(scope="module")
def bad_input_runs():
  """(exit code, stderr) of `rrtf plan` for each of BAD_INPUTS, all in one subprocess (each fails
  in well under a second; a process per case paid ~2 s of start-up each)."""
  return cli_runs_in_one_process([["plan", "--config", "tiny", *args] for args, _ in BAD_INPUTS])


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_one_line_errors(bad_input_runs, case):
  message = BAD_INPUTS[case][1]
  code, stderr = bad_input_runs[case]
  assert code == 2, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("rrtf plan: error:") and message in lines[0], (
    stderr
  )


def test_decode_plan_quantized_starcoder_15b_on_one_v5e():
  """Serving StarCoder-15B from one v5e chip (16 GiB): bf16 weights do not fit (the compiler
  refuses); int8 weights (per channel) do, with the dequantization fused into the matmuls (no
  kernel-sized temporaries). (int4 at batch 16 and 8192 tokens: benchmarks/quantize.py.)"""
  from rrtf_jax.plan import plan_decode

  cfg = load_config("starcoder_15b")
  bf16 = plan_decode(cfg, "v5e:1x1", batch_size=1, context=2048)
  assert bf16.fits is False and "HBM" in bf16.compiler_error and "DOES NOT FIT" in bf16.report()
  int8 = plan_decode(cfg, "v5e:1x1", batch_size=1, context=2048, quant="int8")
  assert int8.fits and int8.weights == "int8 (per channel), bfloat16 embedding"
  # measured 1.3 MiB
  assert 14.5 * 2**30 < int8.param_bytes < 15 * 2**30 and int8.temp_bytes < 16 << 20
  assert int8.cache_bytes == 2 * 40 * 2048 * 128 * 2  # K and V, 40 layers, one kv head of 128, bf16
  assert "verdict      fits" in int8.report()


def test_plan_error_type():
  with pytest.raises(PlanError):
    plan(load_config("tiny"), "v5e:2x2", seq_len=100000)


@pytest.mark.slow
def test_starcoder_15b_full_train_step_on_v5p_4x4x4(tmp_path):
  """The issue's acceptance command: the real RRTF step (R=4, 2048 tokens, AdamW, 8
  micro-batches)."""
  out = tmp_path / "plan.json"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "rrtf_jax.cli",
      "plan",
      "--config",
      "configs/starcoder_15b.py",
      "--topology",
      "v5p:4x4x4",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    cwd=_root(),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (
    "RRTF train step (forward, backward, AdamW): 512 prompts x 4 responses x 2048 tokens "
    "in 8 micro-batch" in proc.stdout
  )
  r = json.loads(out.read_text())
  assert r["num_devices"] == 64 and r["params"] > 15e9 and r["fits"]
  # fp32 parameters and two AdamW moments over 64 chips, about 2.7 GiB each.
  assert 15.5e9 * 12 / 64 <= r["argument_bytes"] < 15.5e9 * 12 / 64 * 1.2
  assert r["temp_bytes"] > 0 and "per device:" in proc.stdout and "total" in proc.stdout


# What libtpu 0.0.42.1 said compiling StarCoder-15B's step for v4:2x4x4 at fsdp=64 (recorded by
# benchmarks/train_step.py; the compile takes two minutes, so the test parses the record).
V4_VMEM_REFUSAL = (
  'RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space vmem. '
  'Used 16.91M of 16.00M vmem. Exceeded vmem capacity by 928.0K. Program vmem requirement 16.91M: '
  'scoped 16.91M Largest program allocations in vmem: 1. Size: 3.00M Operator: '
  'op_name="jit(train_step)/while/body/closed_call/jvp(Transformer)/while/body/closed_call/h/attn/'
  'shard_map/mqa_flash_fwd/pallas_call" Shape: f32[48,128,128]{2,1,0:T(8,128)} Unpadded size: '
  '3.00M Tag: scratch operand XLA label: mqa_flash_fwd.2 = custom-call(custom-call.51, '
  'copy-done.45, fusion.499, get-tuple-element.4153, ...(+1)), '
  'custom_call_target="tpu_custom_call", operand_layout_constraints={s32[4,2048,128]{2,1,0}, '
  's32[4,8,2048]{2,1,0}, bf16[4,1,48,2048,128]{4,3,2,1,0}, bf16[4,1,2048,128]{3,2,1,0}, '
  'bf16[4,1,2048,128]{3,2,1,0}}, frontend_attributes={kernel_metadata={}} Allocation type: scoped '
  '========================== 2. Size: 3.00M Operator: '
  'op_name="jit(train_step)/while/body/closed_call/jvp(Transformer)/while/body/closed_c'
)


def test_vmem_refusal_is_reported_as_vmem_not_hbm():
  from rrtf_jax import plan as plan_lib

  common = dict(
    topology="v4:2x4x4",
    device_kind="TPU v4",
    num_devices=64,
    mesh={"data": 1, "fsdp": 64, "tensor": 1},
    batch_size=512,
    responses=4,
    seq_len=2048,
    microbatches=8,
    remat="full",
    attention="pallas",
    params=10,
    hbm_bytes=16 << 30,
    flops_per_step=1.0,
  )
  r = plan_lib._refused_plan(common, {}, V4_VMEM_REFUSAL, 1.0)
  assert r.fits is False
  assert r.compiler_error == (
    "Ran out of memory in memory space vmem. Used 16.91M of 16.00M vmem in mqa_flash_fwd"
  )
  report = r.report()
  assert (
    "DOES NOT COMPILE: a kernel's blocks exceed the chip's on-chip VMEM" in report
    and "HBM (" not in report
  )
  assert "tensor=N" in report and "remat=full" not in report  # remat is already full


def _root():
  import os

  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
