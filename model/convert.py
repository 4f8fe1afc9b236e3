"""Conversion between HF GPTBigCode checkpoints (safetensors) and ours (orbax), both ways.

HF stores torch Linear weights as [out, in] and packs Q, K, V into one `c_attn`:
  multi-query (K=1): rows [N*H query | H key | H value];
  multi-head (K=N):  rows per head [q_h | k_h | v_h], i.e. a [N, 3, H] layout.
Ours keeps `q_kernel` [D, N, H] and a fused `kv_kernel` [D, 2, K, H], layers stacked [L, ...].
Every mapping here is a transpose/reshape, so HF -> ours -> HF is bit-exact.

The import reads one tensor at a time into preallocated stacked arrays, so peak host memory is
the output size plus about one tensor.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from model import checkpoint as ckpt_lib
from model.config import ModelConfig

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.model",
  "added_tokens.json",
)
# Tensors in some HF checkpoints that carry nothing we need (tied head, attention mask buffers).
_IGNORED_SUFFIXES = ("lm_head.weight", ".attn.bias", ".attn.masked_bias")


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file and tensor."""


def _np_dtype(name: str):
  import ml_dtypes

  if name in ("bfloat16", "bf16"):
    return np.dtype(ml_dtypes.bfloat16)
  try:
    return np.dtype({"fp32": "float32", "fp16": "float16"}.get(name, name))
  except TypeError:
    raise ConversionError(f"unknown dtype {name!r}") from None


# ---- the tensor mapping ---------------------------------------------------------------------
def _layer_specs(cfg: ModelConfig):
  """(hf suffix, our path, hf shape, to_ours, to_hf) for the tensors of one layer."""
  d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  mqa = k == 1 and n != 1
  if k not in (1, n):
    raise ConversionError(f"GPTBigCode has K=1 or K=N kv heads, not K={k}")

  def qkv_w_to_ours(w):  # [N*H + 2*K*H, D] -> (q [D, N, H], kv [D, 2, K, H])
    if mqa:
      q, kk, vv = w[: n * h], w[n * h : n * h + h], w[n * h + h :]
      return q.reshape(n, h, d).transpose(2, 0, 1), np.stack([kk, vv]).reshape(
        2, 1, h, d
      ).transpose(3, 0, 1, 2)
    w = w.reshape(n, 3, h, d)
    return w[:, 0].transpose(2, 0, 1), w[:, 1:].transpose(3, 1, 0, 2)

  def qkv_w_to_hf(q, kv):
    if mqa:
      return np.concatenate(
        [q.transpose(1, 2, 0).reshape(n * h, d), kv.transpose(1, 2, 3, 0).reshape(2 * h, d)]
      )
    # [N, 3, H, D]
    packed = np.concatenate([q.transpose(1, 2, 0)[:, None], kv.transpose(2, 1, 3, 0)], axis=1)
    return packed.reshape(3 * n * h, d)

  def qkv_b_to_ours(b):  # [N*H + 2*K*H] -> (q [N, H], kv [2, K, H])
    if mqa:
      return b[: n * h].reshape(n, h), b[n * h :].reshape(2, 1, h)
    b = b.reshape(n, 3, h)
    return b[:, 0], b[:, 1:].transpose(1, 0, 2)

  def qkv_b_to_hf(q, kv):
    if mqa:
      return np.concatenate([q.reshape(-1), kv.reshape(-1)])
    return np.concatenate([q[:, None], kv.transpose(1, 0, 2)], axis=1).reshape(-1)

  ident = (lambda x: x, lambda x: x)
  t = (lambda x: x.T, lambda x: x.T)
  qkv_rows = n * h + 2 * k * h
  return [
    ("ln_1.weight", ("ln_1", "scale"), (d,), *ident),
    ("ln_1.bias", ("ln_1", "bias"), (d,), *ident),
    (
      "attn.c_attn.weight",
      (("attn", "q_kernel"), ("attn", "kv_kernel")),
      (qkv_rows, d),
      qkv_w_to_ours,
      qkv_w_to_hf,
    ),
    (
      "attn.c_attn.bias",
      (("attn", "q_bias"), ("attn", "kv_bias")),
      (qkv_rows,),
      qkv_b_to_ours,
      qkv_b_to_hf,
    ),
    (
      "attn.c_proj.weight",
      ("attn", "o_kernel"),
      (d, n * h),
      lambda w: w.T.reshape(n, h, d),
      lambda o: o.reshape(n * h, d).T,
    ),
    ("attn.c_proj.bias", ("attn", "o_bias"), (d,), *ident),
    ("ln_2.weight", ("ln_2", "scale"), (d,), *ident),
    ("ln_2.bias", ("ln_2", "bias"), (d,), *ident),
    ("mlp.c_fc.weight", ("mlp", "fc_kernel"), (f, d), *t),
    ("mlp.c_fc.bias", ("mlp", "fc_bias"), (f,), *ident),
    ("mlp.c_proj.weight", ("mlp", "proj_kernel"), (d, f), *t),
    ("mlp.c_proj.bias", ("mlp", "proj_bias"), (d,), *ident),
  ]


def _ident(x):
  return x


def _global_specs(cfg: ModelConfig):
  ident = _ident
  return [
    ("wte.weight", ("wte",), (cfg.vocab_size, cfg.embed_dim), ident, ident),
    ("wpe.weight", ("wpe",), (cfg.max_position_embeddings, cfg.embed_dim), ident, ident),
    ("ln_f.weight", ("ln_f", "scale"), (cfg.embed_dim,), ident, ident),
    ("ln_f.bias", ("ln_f", "bias"), (cfg.embed_dim,), ident, ident),
  ]


def _our_shapes(cfg: ModelConfig) -> dict:
  """Parameter tree of shapes, matching model.Transformer's parameters."""
  d, n, k, h, f, L = (  # noqa: N806  (L: the layer axis, as in the shapes [L, ...] above)
    cfg.embed_dim,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.mlp_dim,
    cfg.num_layers,
  )
  return {
    "wte": (cfg.vocab_size, d),
    "wpe": (cfg.max_position_embeddings, d),
    "ln_f": {"scale": (d,), "bias": (d,)},
    "h": {
      "ln_1": {"scale": (L, d), "bias": (L, d)},
      "ln_2": {"scale": (L, d), "bias": (L, d)},
      "attn": {
        "q_kernel": (L, d, n, h),
        "q_bias": (L, n, h),
        "kv_kernel": (L, d, 2, k, h),
        "kv_bias": (L, 2, k, h),
        "o_kernel": (L, n, h, d),
        "o_bias": (L, d),
      },
      "mlp": {
        "fc_kernel": (L, d, f),
        "fc_bias": (L, f),
        "proj_kernel": (L, f, d),
        "proj_bias": (L, d),
      },
    },
  }


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


# ---- HF -> ours -----------------------------------------------------------------------------
def read_hf_config(hf_dir: str) -> tuple[ModelConfig, dict]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"{path}: not found (an HF checkpoint directory has config.json)")
  try:
    with open(path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: invalid JSON ({e})") from None
  if hf.get("model_type") != "gpt_bigcode":
    raise ConversionError(
      f"{path}: model_type is {hf.get('model_type')!r}, not 'gpt_bigcode' "
      "(only GPTBigCode/StarCoder checkpoints convert)"
    )
  try:
    return ModelConfig.from_hf(hf), hf
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"{path}: {e}") from None


def _weight_map(hf_dir: str) -> tuple[dict[str, str], str]:
  """(tensor name -> safetensors file path, the file that lists the tensors)."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      wm = json.load(f).get("weight_map")
    if not isinstance(wm, dict):
      raise ConversionError(f"{index}: no weight_map")
    return {k: os.path.join(hf_dir, v) for k, v in wm.items()}, index
  if os.path.exists(single):
    from safetensors import safe_open

    with safe_open(single, framework="numpy") as f:
      return {k: single for k in f.keys()}, single  # noqa: SIM118  (safe_open is not iterable)
  raise ConversionError(
    f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
    "(only safetensors checkpoints convert)"
  )


def _hf_prefix(names) -> str:
  return "transformer." if any(n.startswith("transformer.") for n in names) else ""


def hf_to_params(
  hf_dir: str, dtype: str | None = None, progress: bool = True
) -> tuple[ModelConfig, dict]:
  """Reads an HF GPTBigCode checkpoint into (config, numpy param tree) one tensor at a time."""
  from safetensors import safe_open

  cfg, hf = read_hf_config(hf_dir)
  out_dtype = _np_dtype(dtype or hf.get("torch_dtype") or hf.get("dtype") or "float32")
  wmap, listing = _weight_map(hf_dir)
  prefix = _hf_prefix(wmap)
  jobs = []  # (hf name, layer or None, spec)
  for spec in _global_specs(cfg):
    jobs.append((prefix + spec[0], None, spec))
  for i in range(cfg.num_layers):
    for spec in _layer_specs(cfg):
      jobs.append((f"{prefix}h.{i}.{spec[0]}", i, spec))
  expected = {j[0] for j in jobs}
  for name in sorted(wmap):
    if name not in expected and not name.endswith(_IGNORED_SUFFIXES):
      raise ConversionError(
        f"{wmap[name]}: unexpected tensor {name!r} for a {cfg.num_layers}-layer GPTBigCode"
      )
  for name, _, _ in jobs:
    if name not in wmap:
      raise ConversionError(f"{listing}: missing tensor {name!r}")

  import jax

  params = jax.tree.map(
    lambda s: np.empty(s, out_dtype), _our_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)
  )
  by_file: dict[str, list] = {}
  for job in jobs:
    by_file.setdefault(wmap[job[0]], []).append(job)
  with tqdm(total=len(jobs), desc="convert", unit="tensor", disable=not progress) as bar:
    for file, file_jobs in by_file.items():
      with safe_open(file, framework="numpy") as f:
        for name, layer, (_, path, hf_shape, to_ours, _) in file_jobs:
          shape = tuple(f.get_slice(name).get_shape())
          if shape != tuple(hf_shape):
            raise ConversionError(
              f"{file}: tensor {name!r} has shape {list(shape)}, config.json implies "
              f"{list(hf_shape)}"
            )
          value = to_ours(f.get_tensor(name))
          paths, values = ((path,), (value,)) if isinstance(path[0], str) else (path, value)
          for p, v in zip(paths, values):
            # numpy casts to the output dtype while copying, in small buffers
            if layer is None:
              _get(params, p)[...] = v
            else:
              _get(params, ("h",) + p)[layer] = v
          del value, values
          bar.update()
  return cfg, params


def convert_hf(hf_dir: str, out: str, dtype: str | None = None, progress: bool = True) -> str:
  """`rrtf convert`: HF GPTBigCode directory -> our checkpoint directory, tokenizer included."""
  ckpt_lib.check_output(out)
  cfg, params = hf_to_params(hf_dir, dtype, progress)
  tok_files = tuple(
    os.path.join(hf_dir, n) for n in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))
  )
  return ckpt_lib.save_checkpoint(out, cfg, params, tokenizer_files=tok_files)


# ---- ours -> HF -----------------------------------------------------------------------------
def params_to_hf(
  cfg: ModelConfig, params, dtype: str | None = None
) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF tensor name, numpy array) one tensor at a time."""

  def cast(x):
    return x if dtype is None else x.astype(_np_dtype(dtype))

  def get(path):
    return np.asarray(_get(params, path))

  for hf_name, path, _, _, to_hf in _global_specs(cfg):
    yield "transformer." + hf_name, cast(to_hf(get(path)))
  stacked = {}
  for hf_name, path, _, _, to_hf in _layer_specs(cfg):
    stacked[hf_name] = (path, to_hf)
  for i in range(cfg.num_layers):
    for hf_name, (path, to_hf) in stacked.items():
      if isinstance(path[0], str):
        value = to_hf(get(("h",) + path)[i])
      else:
        value = to_hf(*(get(("h",) + p)[i] for p in path))
      yield f"transformer.h.{i}.{hf_name}", cast(np.ascontiguousarray(value))


def export_hf(
  ckpt_dir: str,
  out: str,
  dtype: str | None = None,
  max_shard_bytes: int = 5 << 30,
  progress: bool = True,
) -> str:
  """`rrtf export`: our checkpoint -> HF safetensors (+ index), config.json and tokenizer."""
  from safetensors.numpy import save_file

  import jax

  final = os.path.abspath(out)
  if os.path.exists(final):
    raise FileExistsError(f"{final}: output already exists")
  if ckpt_lib.is_checkpoint(ckpt_dir) and ckpt_lib.read_config(ckpt_dir).quant_bits:
    raise ValueError(
      f"{ckpt_dir}: a quantized checkpoint has no HF GPTBigCode form; export the one it was "
      "quantized from"
    )
  cfg, params = ckpt_lib.load_checkpoint(ckpt_dir)
  params = jax.tree.map(np.asarray, params)
  tmp = ckpt_lib.temp_sibling(final)
  os.makedirs(tmp)
  try:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = total = 0
    for name, value in tqdm(
      params_to_hf(cfg, params, dtype),
      total=expected_tensor_count(cfg),
      desc="export",
      unit="tensor",
      disable=not progress,
    ):
      if size and size + value.nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = value
      size += value.nbytes
      total += value.nbytes
    out_dtype = str(next(iter(shards[0].values())).dtype)
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = (
        "model.safetensors"
        if len(shards) == 1
        else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      )
      save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
      weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg.to_hf(torch_dtype=out_dtype), f, indent=2)
    tok = ckpt_lib.tokenizer_path(ckpt_dir)
    if tok:
      ckpt_lib.copy_tree(tok, tmp)
    os.rename(tmp, final)
  except BaseException:
    ckpt_lib.remove_dir(tmp)
    raise
  return final


def expected_tensor_count(cfg: ModelConfig) -> int:
  return 4 + 12 * cfg.num_layers


def hf_param_bytes(cfg: ModelConfig, dtype="float32") -> int:
  import jax

  shapes = jax.tree.leaves(_our_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  return sum(math.prod(s) for s in shapes) * _np_dtype(dtype).itemsize
