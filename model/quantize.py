"""Weight-only quantization of a model's linear layers (`rrtf quantize`).

  int8       per output channel, symmetric: w ~ q * scale[D_out], q in [-128, 127]
  int4 RTN   groups of `group` input rows, symmetric: w ~ q * scale[G, D_out], q in [-8, 7]
  int4 GPTQ  the same format; rows are rounded in order and each rounding error is spread over
             the rows not yet rounded, weighted by the inverse Hessian H = X^T X of the layer's
             calibration inputs X (Frantar et al. 2022, arXiv 2210.17323)

The arithmetic is qwix's (Google's JAX quantization library): `qarray.quantize` for
round-to-nearest, and for GPTQ the steps of `qwix.contrib.gptq_core.quantize_weight`, run here
as `lax.fori_loop`s (see `quantize_gptq` for why). qwix's model-level
entry points (`quantize_model`, its GPTQ calibration provider) intercept einsums whose weight
operand is the parameter itself with one contracting axis; ours cast the kernel first, the
attention output projection contracts two axes (heads, head_dim) and the layers are one
`nn.scan`, so the model-level pass is written here: layer by layer, each layer's kernels are
quantized from the Hessians of its inputs, and the next layer is calibrated on the outputs of
the quantized ones (GPTQ's sequential order).

The stored format (model/transformer.py `_dense`): a kernel [*in, *out] keeps its name with
int8/int4 values, and `<name>_scale` [G, *out] holds the scales of G groups of consecutive
(flattened) input rows, dequantized inside the layer that uses them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig

METHODS = ("int8", "int4-rtn", "int4-gptq")
DEFAULT_GROUP = 128  # int4 input rows per scale (GPTQ's and AutoGPTQ's usual choice)

# The linear layers of a block: (path under params["h"], input dims, the sown input they see).
# A model has those of its config (`kernels`): fc_kernel (GELU MLP) or gate_kernel and
# up_kernel (gated MLP), which see the same input.
KERNELS = (
  (("attn", "q_kernel"), 1, ("attn", "attn_in")),
  (("attn", "kv_kernel"), 1, ("attn", "attn_in")),
  (("attn", "o_kernel"), 2, ("attn", "o_in")),
  (("mlp", "fc_kernel"), 1, ("mlp", "fc_in")),
  (("mlp", "gate_kernel"), 1, ("mlp", "fc_in")),
  (("mlp", "up_kernel"), 1, ("mlp", "fc_in")),
  (("mlp", "proj_kernel"), 1, ("mlp", "proj_in")),
)
# The [V, D] tables quantized by `embedding=True` (int8, a scale per row): the embedding and,
# where the model has its own, the LM head.
TABLES = ("wte", "lm_head")


def kernels(cfg: ModelConfig) -> tuple:
  """The KERNELS rows of the linear layers `cfg`'s blocks have."""
  mlp_in = {"gelu": ("fc_kernel",), "gated": ("gate_kernel", "up_kernel")}[cfg.mlp]
  return tuple(k for k in KERNELS if k[0][0] == "attn" or k[0][1] in mlp_in + ("proj_kernel",))


@dataclasses.dataclass
class Quantized:
  q: np.ndarray  # int8 [D_in, D_out] (int4 values kept in int8)
  scale: np.ndarray  # float32 [G, D_out]: G = 1 (per channel) or D_in // group
  bits: int

  @property
  def group(self) -> int:
    return self.q.shape[0] // self.scale.shape[0]

  def dequantize(self) -> np.ndarray:
    d_in, d_out = self.q.shape
    g = self.scale.shape[0]
    w = self.q.reshape(g, d_in // g, d_out).astype(np.float32) * self.scale[:, None, :]
    return w.reshape(d_in, d_out)


def _qtype(bits: int):
  if bits not in (4, 8):
    raise ValueError(f"bits must be 4 or 8, got {bits}")
  return jnp.int4 if bits == 4 else jnp.int8


def _check(w, group: int | None) -> int:
  if w.ndim != 2:
    raise ValueError(f"a kernel must be [D_in, D_out], got shape {w.shape}")
  group = group or w.shape[0]
  if w.shape[0] % group:
    raise ValueError(f"group {group} does not divide D_in {w.shape[0]}")
  return group


def _how(bits: int, group: int, d_in: int, in_axis: int):
  from qwix._src.core import qarray

  return qarray.HowToQuantize(
    qtype=_qtype(bits),
    channelwise_axes=(1 - in_axis,),
    tiled_axes={in_axis: group} if group < d_in else {},
  )


def _to_numpy(qa, bits: int, transpose: bool = False) -> Quantized:
  q, scale = np.asarray(qa.qvalue).astype(np.int8), np.asarray(qa.scale, np.float32)
  return Quantized(q.T, scale.T, bits) if transpose else Quantized(q, scale, bits)


def quantize_rtn(w, bits: int = 8, group: int | None = None) -> Quantized:
  """Round to nearest: per output channel (group None) or per `group` input rows."""
  from qwix._src.core import qarray

  w = jnp.asarray(w, jnp.float32)
  group = _check(w, group)
  return _to_numpy(qarray.quantize(w, _how(bits, group, w.shape[0], 0)), bits)


def hessian(x) -> np.ndarray:
  """X^T X [D_in, D_in] of calibration inputs x [N, D_in] (sums over batches add up)."""
  x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
  return np.asarray(x.T @ x)


def quantize_gptq(
  w, h, bits: int = 4, group: int | None = None, damp: float = 0.01, blocksize: int = 128
) -> Quantized:
  """GPTQ of a kernel w [D_in, D_out] given the Hessian h [D_in, D_in] of its inputs (`hessian`):
  qwix's `gptq_core.quantize_weight` steps (the scales of each group from the weights as GPTQ has
  updated them by then; inputs never active get zero weights), run as `lax.fori_loop`s.

  qwix unrolls a Python loop over all D_in rows, so its compile time grows with D_in
  (StarCoder's projection has 24576); the loops below compile once per shape.
  """
  w = jnp.asarray(w, jnp.float32)
  group = _check(w, group)
  if np.shape(h) != (w.shape[0], w.shape[0]):
    raise ValueError(f"the Hessian must be [{w.shape[0]}, {w.shape[0]}], got {np.shape(h)}")
  q, scale = _gptq(
    w.T, jnp.asarray(h, jnp.float32), bits=bits, group=group, damp=float(damp), blocksize=blocksize
  )
  return Quantized(np.asarray(q).astype(np.int8).T, np.asarray(scale, np.float32).T, bits)


@functools.partial(jax.jit, static_argnames=("bits", "group", "damp", "blocksize"))
def _gptq(w, h, *, bits: int, group: int, damp: float, blocksize: int):
  """w [O, I] (rows are output channels, as qwix and the reference lay them out), h [I, I] ->
  (q [O, I] int, scale [O, G])."""
  from qwix.contrib import gptq_core

  o, i_dim = w.shape
  grouped = group < i_dim
  how = _how(bits, group, i_dim, 1)
  dead = jnp.diag(h) == 0
  h = jnp.where(dead & jnp.eye(i_dim, dtype=bool), 1.0, h)
  w = jnp.where(dead, 0.0, w)
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(i_dim)
  hinv = jnp.linalg.cholesky(gptq_core.cholesky_inverse(jnp.linalg.cholesky(h)), upper=True)
  # Blocks of up to `blocksize` columns (whole groups); as in qwix and the reference, the scales
  # of a block's groups come from the weights as they stand when the block starts.
  step = group if grouped else 1
  blk = next(b for b in range(max(blocksize, step) // step * step, 0, -step) if i_dim % b == 0)
  channel_scale = None if grouped else gptq_core.find_params(w, how)[0]  # [O, 1]
  cols = jnp.arange(blk)

  def block(b, carry):
    w, q, scales = carry
    i1 = b * blk
    w1 = jax.lax.dynamic_slice(w, (0, i1), (o, blk))
    hinv1 = jax.lax.dynamic_slice(hinv, (i1, i1), (blk, blk))
    if grouped:  # [O, blk / group]
      scale = jax.vmap(lambda g: gptq_core.find_params(g, how)[0][:, 0], in_axes=1, out_axes=1)(
        w1.reshape(o, blk // group, group)
      )
    else:
      scale = channel_scale

    def column(i, c):
      w1, err1, q1 = c
      col = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)  # [O]
      s = jax.lax.dynamic_index_in_dim(scale, i // step if grouped else 0, axis=1)  # [O, 1]
      qc, dq = gptq_core.quantize(col[:, None], how.qtype, s, None)
      e = (col - dq[:, 0]) / hinv1[i, i]
      w1 = w1 - jnp.outer(e, jnp.where(cols >= i, hinv1[i], 0.0))
      return w1, err1.at[:, i].set(e), q1.at[:, i].set(qc[:, 0])

    _, err1, q1 = jax.lax.fori_loop(
      0, blk, column, (w1, jnp.zeros_like(w1), jnp.zeros((o, blk), how.qtype))
    )
    rest = jnp.where(
      jnp.arange(i_dim) >= i1 + blk, jax.lax.dynamic_slice(hinv, (i1, 0), (blk, i_dim)), 0.0
    )
    w = w - err1 @ rest  # spread the block's errors over the columns after it
    if grouped:
      scales = jax.lax.dynamic_update_slice(scales, scale, (0, b * (blk // group)))
    return w, jax.lax.dynamic_update_slice(q, q1, (0, i1)), scales

  g = i_dim // group if grouped else 1
  _, q, scales = jax.lax.fori_loop(
    0, i_dim // blk, block, (w, jnp.zeros((o, i_dim), how.qtype), jnp.zeros((o, g)))
  )
  return q, scales if grouped else channel_scale


def output_error(w, quantized: Quantized, x) -> float:
  """Mean squared error of the layer's outputs on inputs x: ||x W - x W_q||^2 / N."""
  x = np.asarray(x, np.float64).reshape(-1, quantized.q.shape[0])
  diff = x @ (np.asarray(w, np.float64) - quantized.dequantize())
  return float(np.mean(np.sum(diff * diff, axis=-1)))


def _relative_error(w, quantized: Quantized, h) -> float:
  """||X (W - W_q)||^2 / ||X W||^2 from the Hessian X^T X: the calibration loss GPTQ minimises."""
  h = np.asarray(h, np.float64)
  w = np.asarray(w, np.float64)
  d = w - quantized.dequantize()
  return float(np.einsum("io,ij,jo->", d, h, d) / max(np.einsum("io,ij,jo->", w, h, w), 1e-30))


# ---- a whole model -------------------------------------------------------------------------------
def quantized_config(
  cfg: ModelConfig,
  method: str,
  group: int | None = None,
  embedding: bool = False,
  dtype: str = "bfloat16",
) -> ModelConfig:
  """The config of `cfg` quantized by `method`; int8 is per channel unless `group` is given."""
  if method not in METHODS:
    raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
  if cfg.quant_bits:
    raise ValueError("the checkpoint is quantized already; quantize the full-precision one")
  bits = 8 if method == "int8" else 4
  group = (0 if bits == 8 else DEFAULT_GROUP) if group is None else group
  if group < 0:
    raise ValueError(f"--group must be >= 0 (0 = one scale per output channel), got {group}")
  qcfg = cfg.replace(
    quant_bits=bits, quant_group=group, quant_embedding=embedding, param_dtype=dtype
  )
  for d_in in {cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim}:
    qcfg.quant_groups(d_in)  # a group that does not divide a kernel's rows is an error now
  return qcfg


def quantize_params(
  cfg: ModelConfig,
  params,
  method: str,
  *,
  group: int | None = None,
  embedding: bool = False,
  dtype: str = "bfloat16",
  calibration=None,
  progress: bool = False,
):
  """Quantizes a model's parameters -> (quantized config, parameters, report).

  Args:
    cfg, params: the full-precision model (params as `load_checkpoint` returns them).
    method: int8 | int4-rtn | int4-gptq.
    group: input rows per scale (default: per channel for int8, DEFAULT_GROUP for int4).
    embedding: also quantize the embedding and the LM head (wte, and an untied lm_head): int8,
      one scale per vocab row.
    dtype: what the parameters that stay in floating point (biases, norms, positions, scales and
      an unquantized embedding or LM head) are stored as.
    calibration: (tokens [N, T], mask [N, T]) prompts; needed by GPTQ. With it every method
      reports each kernel's calibration loss (relative output error) and RTN's for comparison.
  """
  qcfg = quantized_config(cfg, method, group, embedding, dtype)
  gptq = method.endswith("gptq")
  if gptq and calibration is None:
    raise ValueError("int4-gptq needs calibration prompts (--calibration FILE)")
  # Host (NumPy) arrays throughout: a large model's parameters need not fit one device.
  fdt = jnp.dtype(dtype)
  layers = jax.tree.map(np.asarray, params["h"])
  out = jax.tree.map(
    lambda a: np.asarray(a).astype(fdt), {k: v for k, v in params.items() if k != "h"}
  )
  table = kernels(cfg)
  missing = [".".join(("h",) + p) for p, _, _ in table if p[1] not in layers.get(p[0], {})]
  if missing:
    raise ValueError(f"the parameters have no {', '.join(missing)} (config.mlp={cfg.mlp!r})")
  paths = {path for path, _, _ in table}  # replaced below, not cast
  out_layers = {  # everything else cast (subtrees too: the q/k norms' {"scale": ...})
    m: {n: jax.tree.map(lambda a: a.astype(fdt), a) for n, a in d.items() if (m, n) not in paths}
    for m, d in layers.items()
  }
  if embedding:
    for name in TABLES:
      if name in params:  # rows of a table are its output channels
        e = quantize_rtn(np.asarray(params[name], np.float32).T, 8)
        out[name], out[f"{name}_scale"] = e.q.T.copy(), e.scale[0].astype(fdt)

  calib = None if calibration is None else _Calibration(cfg, params, *calibration)
  report: dict = {"kernels": {}}
  qs: dict = {path: [] for path, _, _ in table}
  from tqdm import tqdm

  for i in tqdm(
    range(cfg.num_layers), desc=f"quantize ({method})", unit="layer", disable=not progress
  ):
    layer = jax.tree.map(lambda a: a[i], layers)
    inputs = calib.layer_inputs(layer) if calib is not None else None
    for path, n_in, source in table:
      w = _get(layer, path)
      w2 = w.reshape(math.prod(w.shape[:n_in]), -1).astype(np.float32)
      g = w2.shape[0] // qcfg.quant_groups(w2.shape[0])
      rtn = quantize_rtn(w2, qcfg.quant_bits, g)
      quant = quantize_gptq(w2, inputs[source], qcfg.quant_bits, g) if gptq else rtn
      qs[path].append(quant)
      if inputs is not None:
        name = ".".join(("h", str(i)) + path)
        report["kernels"][name] = {
          "calibration_error": _relative_error(w2, quant, inputs[source]),
          "rtn_calibration_error": _relative_error(w2, rtn, inputs[source]),
        }
      _set(layer, path, quant.dequantize().reshape(w.shape))
    if calib is not None:
      calib.advance(layer)  # the next layer sees this layer's quantized outputs
  for path, n_in, _ in table:
    shape = layers[path[0]][path[1]].shape[1:]
    q = np.stack([x.q.reshape(shape) for x in qs[path]])
    scale = np.stack([x.scale.reshape((x.scale.shape[0],) + shape[n_in:]) for x in qs[path]])
    out_layers[path[0]][path[1]] = q.astype(qcfg.quant_dtype)
    out_layers[path[0]][f"{path[1]}_scale"] = scale.astype(fdt)
  out["h"] = out_layers
  if report["kernels"]:
    errs = list(report["kernels"].values())
    report["calibration_error"] = float(np.mean([e["calibration_error"] for e in errs]))
    report["rtn_calibration_error"] = float(np.mean([e["rtn_calibration_error"] for e in errs]))
    report["calibration_tokens"] = calib.tokens
  return qcfg, out, report


def _get(tree, path):
  return tree[path[0]][path[1]]


def _set(tree, path, value):
  tree[path[0]][path[1]] = value


class _Calibration:
  """The calibration prompts' hidden states entering the current layer, in float32, and the
  Hessians of each of its kernels' inputs (padding excluded).

  The layers are the model's own Block (model/transformer.py) with the positions the model
  derives from the mask; what enters the first is the model's embedding step, `embed`."""

  def __init__(self, cfg: ModelConfig, params, tokens, mask, batch: int = 16):
    from model.transformer import Block, positions_from_segments

    self.cfg = cfg.replace(dtype="float32", param_dtype="float32", remat="none", attention="xla")
    self.sources = sorted({source for _, _, source in kernels(cfg)})
    tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, np.int32)
    if tokens.ndim != 2 or tokens.shape != mask.shape or not mask.any():
      raise ValueError("calibration needs tokens and a mask [N, T] with some real tokens")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
      raise ValueError(f"calibration token ids must be in [0, {cfg.vocab_size})")
    self.tokens = int(mask.sum())
    self.batches = []
    for s in range(0, len(tokens), batch):
      t, m = tokens[s : s + batch], mask[s : s + batch]
      pos = np.asarray(positions_from_segments(jnp.asarray(m)))
      self.batches.append((jnp.asarray(embed(self.cfg, params, t, pos)), jnp.asarray(m), pos))
    block = Block(self.cfg)
    self._apply = jax.jit(
      lambda p, x, m, pos: block.apply({"params": p}, x, m, pos, mutable=["intermediates"])
    )

  def layer_inputs(self, layer) -> dict:
    hs: dict = {}
    for x, m, pos in self.batches:
      _, state = self._apply(_f32(layer), x, m, pos)
      keep = np.asarray(m).reshape(-1) > 0
      for mod, name in self.sources:
        v = np.asarray(state["intermediates"][mod][name][0])
        hs[(mod, name)] = hs.get((mod, name), 0) + hessian(v.reshape(keep.shape[0], -1)[keep])
    return hs

  def advance(self, layer) -> None:
    p = _f32(layer)
    self.batches = [(self._apply(p, x, m, pos)[0][0], m, pos) for x, m, pos in self.batches]


def embed(cfg: ModelConfig, params, tokens, positions) -> np.ndarray:
  """What enters the first block, in float32, as model/transformer.Transformer computes it from
  full-precision parameters: the token embedding, plus the learned position embedding where the
  model has one (with RoPE the positions act inside attention)."""
  x = np.asarray(params["wte"], np.float32)[tokens]
  if cfg.position_embedding == "learned":
    x = x + np.asarray(params["wpe"], np.float32)[positions]
  return x


def _f32(layer):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), layer)
