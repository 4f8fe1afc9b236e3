"""Attention on TPU, compiled ahead of time from a CPU host: memory, FLOPs and compile time.

A benchmark, never pass/fail. For each sequence length T (--seq-lens, default 2048 4096 8192)
and each implementation of `model.attention.dot_product_attention` -- pallas (ours, Mosaic),
splash (JAX's splash kernels) and xla (plain einsum reference) -- the forward + backward pass
(jax.value_and_grad w.r.t. q, k, v of sum(out.astype(f32)**2)) at StarCoder's attention shape
(B=1, N=48 query heads, K=1 kv head, H=128, bf16, causal, segment ids all ones) is lowered and
compiled with libtpu for an abstract TPU topology (--topology, default v5p:2x2x1, 4 devices) on a
mesh tensor=4: q sharded over heads, k/v/segment ids replicated; Pallas kernels run under the
dispatch's shard_map. No TPU is needed or used. Reported per implementation: XLA's
memory_analysis (temporaries, arguments, outputs; per device), cost_analysis FLOPs (per device;
our kernels carry a pl.CostEstimate), compile seconds, whether the compiled HLO holds a Mosaic
kernel ("tpu_custom_call"), next to the [N/4, T, T] fp32 score bytes per device that plain
attention would materialise. A compile failure (e.g. out of HBM) is recorded as one line.

Sliding window: the same compile at StarCoder2-15B's attention shape (B=1, N=48, K=4 kv heads,
H=128, bf16, causal; k/v sharded over tensor=4 with their query heads) at T=16384
(--window-seq-lens), each implementation with the sliding window (--window, default 4096,
StarCoder2's) and without it (full causal), and the ratios windowed / full of per-device FLOPs and
temporaries.

Then, informational only: CPU wall time of our kernel in Pallas *interpret mode* (B=1, T=512,
N=8, K=1, H=64, fp32, causal), forward and forward+backward, median of 3 after a warm-up, with
model.attention.xla_attention on the same inputs as a same-run baseline. Interpret-mode time says
nothing about TPU speed.

Run from the repo root:
  python benchmarks/attention_aot.py            # everything: results/attention_aot.{md,json}
  python benchmarks/attention_aot.py --quick    # T=2048 only, no window, no CPU timing;
                                                # *_quick.{md,json}
  python benchmarks/attention_aot.py --only-window   # the sliding-window section only, merged
      # into results/attention_aot.{md,json}: the other sections' measured rows are kept
"""

import os

# compile for TPU from this host; topology_devices quiets libtpu
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import attention, sharding  # noqa: E402
from model.flash_attention import flash_attention  # noqa: E402
from rrtf_jax.plan import topology_devices  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLS = tuple(i for i in attention.IMPLEMENTATIONS if i != "auto")  # each kernel, not the dispatch
B, N, K, H = 1, 48, 1, 128
# StarCoder2-15B's attention: 48 query heads, 4 kv heads, sliding window 4096, 16k context
N2, K2, WINDOW2 = 48, 4, 4096


def _ver(pkg):
  try:
    return version(pkg)
  except PackageNotFoundError:
    return None


def _loss(impl, window=None):
  def f(q, k, v, seg):
    out = attention.dot_product_attention(
      q,
      k,
      v,
      q_segment_ids=seg,
      kv_segment_ids=seg,
      causal=True,
      sm_scale=H**-0.5,
      window=window,
      impl=impl,
    )
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return jax.value_and_grad(f, argnums=(0, 1, 2))


def aot_one(impl, t, mesh, n=N, kh=K, window=None):
  rep = NamedSharding(mesh, P())
  heads = NamedSharding(mesh, P(None, None, "tensor", None))
  kv = heads if kh > 1 else rep  # several kv heads shard with their query heads
  args = (
    jax.ShapeDtypeStruct((B, t, n, H), jnp.bfloat16, sharding=heads),
    jax.ShapeDtypeStruct((B, t, kh, H), jnp.bfloat16, sharding=kv),
    jax.ShapeDtypeStruct((B, t, kh, H), jnp.bfloat16, sharding=kv),
    jax.ShapeDtypeStruct((B, t), jnp.int32, sharding=rep),
  )
  shards = mesh.shape["tensor"]
  row = dict(T=t, impl=impl, score_bytes_per_device=(n // shards) * t * t * 4 * B)
  if n != N or kh != K or window is not None:
    row.update(N=n, K=kh, window=window)
  t0 = time.perf_counter()
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      compiled = jax.jit(_loss(impl, window)).lower(*args).compile()
  except Exception as e:  # noqa: BLE001  (recorded, not raised: e.g. out of HBM)
    msg = f"{type(e).__name__}: {str(e).strip()}"
    row.update(
      error=msg.splitlines()[0][:300], error_full=msg[:4000], compile_s=time.perf_counter() - t0
    )
    return row
  row["compile_s"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  for key in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
    row[key] = getattr(mem, key, None) if mem is not None else None
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row["flops_per_device"] = (cost or {}).get("flops")
  row["mosaic_kernel"] = "tpu_custom_call" in compiled.as_text()
  return row


def _median_s(fn, *args, reps=3):
  jax.block_until_ready(fn(*args))  # warm-up (and compile)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def cpu_interpret_timing():
  b, t, n, kh, h = 1, 512, 8, 1, 64
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32)
  k, v = (jax.random.normal(x, (b, t, kh, h), jnp.float32) for x in ks[1:])
  seg = jnp.ones((b, t), jnp.int32)
  fns = {
    "pallas_interpret": lambda q, k, v: flash_attention(q, k, v, causal=True),
    "xla": lambda q, k, v: attention.xla_attention(
      q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, sm_scale=h**-0.5
    ),
  }
  res = dict(
    shape=dict(B=b, T=t, N=n, K=kh, H=h, dtype="float32", causal=True),
    reps=3,
    warmup=1,
    note="Pallas interpret mode on CPU: says nothing about TPU speed",
  )
  for name, f in fns.items():
    grad = jax.jit(
      jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
    )
    fwd_s, fwd_all = _median_s(jax.jit(f), q, k, v)
    bwd_s, bwd_all = _median_s(grad, q, k, v)
    res[name] = dict(fwd_s=fwd_s, fwd_s_all=fwd_all, fwd_bwd_s=bwd_s, fwd_bwd_s_all=bwd_all)
  res["ratio_pallas_interpret_over_xla"] = {
    m: res["pallas_interpret"][m] / res["xla"][m] for m in ("fwd_s", "fwd_bwd_s")
  }
  return res


def _mib(x):
  return "-" if x is None else f"{x / 2**20:,.1f} MiB"


def _row_cells(r):
  if "error" in r:
    return [f"FAILED: {r['error'].replace('|', '/')}", "", "", "", f"{r['compile_s']:.1f}", "-"]
  fl = r["flops_per_device"]
  return [
    _mib(r["temp_size_in_bytes"]),
    _mib(r["argument_size_in_bytes"]),
    _mib(r["output_size_in_bytes"]),
    "-" if fl is None else f"{fl:.3e}",
    f"{r['compile_s']:.1f}",
    "yes" if r["mosaic_kernel"] else "no",
  ]


def _ratio(a, b):
  return None if a is None or not b else a / b


def window_ratios(rows):
  """{T: {impl: {flops, temp}}}: windowed / full causal, where both compiled."""
  out = {}
  for r in rows:
    if r.get("window") is None or "error" in r:
      continue
    full = [
      f for f in rows if f["T"] == r["T"] and f["impl"] == r["impl"] and f.get("window") is None
    ]
    if not full or "error" in full[0]:
      continue
    out.setdefault(str(r["T"]), {})[r["impl"]] = dict(
      flops=_ratio(r["flops_per_device"], full[0]["flops_per_device"]),
      temp=_ratio(r["temp_size_in_bytes"], full[0]["temp_size_in_bytes"]),
    )
  return out


def _x(v):
  return "-" if v is None else f"{v:.3f}"


def window_markdown(section):
  c = section["config"]
  out = [
    f"Sliding window: AOT compile for TPU `{c['topology']}` (mesh tensor={c['shards']}), fwd+bwd, "
    f"StarCoder2-15B's attention B={c['B']} N={c['N']} K={c['K']} H={c['H']} bf16 causal, "
    f"window {c['window']} vs none (full causal); bytes and FLOPs per device.",
    "",
    "| T | impl | window | temp | args | outputs | FLOPs/device | compile s | Mosaic kernel | "
    "avoided scores [N/4,T,T] f32 |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in section["rows"]:
    window = "none" if r.get("window") is None else str(r["window"])
    cells = [str(r["T"]), r["impl"], window, *_row_cells(r), _mib(r["score_bytes_per_device"])]
    out.append("| " + " | ".join(cells) + " |")
  out += ["", "| T | impl | FLOPs windowed/full | temp windowed/full |", "|---|---|---|---|"]
  for t, impls in section["ratios"].items():
    for impl, ra in impls.items():
      out.append(f"| {t} | {impl} | {_x(ra['flops'])} | {_x(ra['temp'])} |")
  out += [
    "",
    "Splash's FLOPs are those of the XLA ops around its kernels only (its kernels carry no cost "
    "estimate), so its FLOPs ratio says nothing about the kernels. XLA computes the full [T, T] "
    "scores and masks them: its window saves nothing. Ours skips the blocks outside the window "
    "(FLOPs from its pl.CostEstimate of the visited tiles); its temporaries are layout copies "
    "linear in T, which the window does not change.",
  ]
  return "\n".join(out) + "\n"


def run_window(mesh, topology, seq_lens, window):
  shards = mesh.shape["tensor"]
  rows = []
  for t in seq_lens:
    for impl in IMPLS:
      for w in (window, None):
        r = aot_one(impl, t, mesh, n=N2, kh=K2, window=w)
        rows.append(r)
        _print_row(r, f"T={t} {impl} window={w}")
  section = dict(
    config=dict(
      B=B,
      N=N2,
      K=K2,
      H=H,
      window=window,
      dtype="bfloat16",
      causal=True,
      segment_ids="all ones",
      seq_lens=seq_lens,
      impls=list(IMPLS),
      topology=topology,
      shards=shards,
      kv_sharding="k, v sharded over tensor with their query heads (K % shards == 0)",
      loss="value_and_grad wrt q,k,v of sum(out.astype(f32)**2)",
      units="bytes and FLOPs per device (SPMD-partitioned module)",
    ),
    rows=rows,
  )
  section["ratios"] = window_ratios(rows)
  for t, impls in section["ratios"].items():
    for impl, ra in impls.items():
      print(f"  T={t} {impl}: windowed/full FLOPs {_x(ra['flops'])}, temporaries {_x(ra['temp'])}")
  return section


def _print_row(r, label):
  print(
    f"  {label}: "
    + (
      f"FAILED {r['error']}"
      if "error" in r
      else f"temp {_mib(r['temp_size_in_bytes'])}, flops {r['flops_per_device']}, "
      f"{r['compile_s']:.1f}s, mosaic={r['mosaic_kernel']}"
    ),
    flush=True,
  )


def markdown(rows, topo, shards):
  out = [
    f"AOT compile for TPU `{topo}` (mesh tensor={shards}), fwd+bwd, B={B} N={N} K={K} H={H} bf16 "
    "causal; bytes and FLOPs per device.",
    "",
    "| T | impl | temp | args | outputs | FLOPs/device | compile s | Mosaic kernel | avoided "
    "scores [N/4,T,T] f32 |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    cells = _row_cells(r)
    out.append(
      "| " + " | ".join([str(r["T"]), r["impl"], *cells, _mib(r["score_bytes_per_device"])]) + " |"
    )
  out += [
    "",
    "FLOPs are XLA's cost_analysis: a Pallas kernel without a pl.CostEstimate (splash's) counts "
    "as 0, so splash's figure covers only the XLA ops around its kernels. Ours counts the tiles "
    "it computes.",
  ]
  return "\n".join(out) + "\n"


def timing_markdown(timing):
  pi, xl, ra = (
    timing["pallas_interpret"],
    timing["xla"],
    timing["ratio_pallas_interpret_over_xla"],
  )
  return (
    "\nCPU wall time, informational only -- Pallas interpret mode says nothing about TPU speed "
    f"(B=1 T=512 N=8 K=1 H=64 fp32 causal, median of 3 after a warm-up):\n\n"
    "| | fwd s | fwd+bwd s |\n|---|---|---|\n"
    f"| pallas (interpret) | {pi['fwd_s']:.4f} | {pi['fwd_bwd_s']:.4f} |\n"
    f"| xla | {xl['fwd_s']:.4f} | {xl['fwd_bwd_s']:.4f} |\n"
    f"| ratio pallas/xla | {ra['fwd_s']:.1f}x | {ra['fwd_bwd_s']:.1f}x |\n"
  )


def render(result):
  """The Markdown report of a result (JSON) dict: every section it holds."""
  env = result["env"]
  md = markdown(result["aot"], env["topology"], env["mesh"]["tensor"])
  if result.get("cpu_interpret_timing"):
    md += timing_markdown(result["cpu_interpret_timing"])
  if result.get("window"):
    md += "\n" + window_markdown(result["window"])
  return md


def _env(topology, devices, mesh):
  return dict(
    python=platform.python_version(),
    jax=jax.__version__,
    jaxlib=_ver("jaxlib"),
    libtpu=_ver("libtpu"),
    flax=_ver("flax"),
    topology=topology,
    device_kind=devices[0].device_kind,
    num_devices=len(devices),
    mesh=dict(mesh.shape),
    host_cpus=os.cpu_count(),
    host=platform.platform(),
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
  p.add_argument("--topology", default="v5p:2x2x1")
  p.add_argument(
    "--quick", action="store_true", help="T=2048 only, skip the window and the CPU timing"
  )
  p.add_argument("--window", type=int, default=WINDOW2, help="sliding window of the window section")
  p.add_argument("--window-seq-lens", type=int, nargs="+", default=[16384])
  p.add_argument(
    "--only-window",
    action="store_true",
    help="run only the window section and merge it into results/attention_aot.{md,json}",
  )
  a = p.parse_args()
  if a.window < 1:
    p.error("--window must be >= 1")
  stem = "attention_aot_quick" if a.quick else "attention_aot"
  json_path = os.path.join(RESULTS, stem + ".json")
  if a.only_window and (a.quick or not os.path.exists(json_path)):
    p.error(f"--only-window merges into {json_path}: run without it first (and without --quick)")
  seq_lens = [2048] if a.quick else a.seq_lens
  devices = topology_devices(a.topology)
  mesh = sharding.make_mesh(f"tensor={len(devices)}", devices)
  print(
    f"topology {a.topology}: {len(devices)} devices ({devices[0].device_kind}); mesh "
    f"{dict(mesh.shape)}"
  )
  env = _env(a.topology, devices, mesh)
  if a.only_window:
    with open(json_path) as f:
      result = json.load(f)  # the other sections' measured rows, kept as they are
  else:
    rows = []
    for t in seq_lens:
      for impl in IMPLS:
        r = aot_one(impl, t, mesh)
        rows.append(r)
        _print_row(r, f"T={t} {impl}")
    result = dict(
      benchmark="attention_aot: AOT TPU compile of attention fwd+bwd from a CPU host",
      config=dict(
        B=B,
        N=N,
        K=K,
        H=H,
        dtype="bfloat16",
        causal=True,
        segment_ids="all ones",
        seq_lens=seq_lens,
        impls=list(IMPLS),
        quick=a.quick,
        loss="value_and_grad wrt q,k,v of sum(out.astype(f32)**2)",
        units="bytes and FLOPs per device (SPMD-partitioned module)",
      ),
      env=env,
      aot=rows,
      cpu_interpret_timing=None if a.quick else cpu_interpret_timing(),
    )
  if not a.quick:
    result["window"] = run_window(mesh, a.topology, a.window_seq_lens, a.window)
    result["window"]["env"] = env
  md = render(result)
  print("\n" + md)
  os.makedirs(RESULTS, exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
    f.write(md)
  print(f"wrote {os.path.join(RESULTS, stem)}.{{md,json}}")


if __name__ == "__main__":
  main()
