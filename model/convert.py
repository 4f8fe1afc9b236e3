"""Conversion between HF checkpoints (safetensors) and ours (orbax), both ways, for every
family in model/families.py (GPTBigCode, Starcoder2, Llama, Mistral, Qwen2, Qwen3).

The family comes from config.json (`architectures`, else `model_type`); families.py maps each
HF tensor to a slice of one of our parameters by a transpose/reshape, so HF -> ours -> HF is
bit-exact. Ours keeps `q_kernel` [D, N, H] and a fused `kv_kernel` [D, 2, K, H], layers
stacked [L, ...].

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
from model import families
from model.config import ModelConfig

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.model",
  "added_tokens.json",
  "chat_template.jinja",
)
# Tensors in some HF checkpoints that carry nothing we need (a tied head, attention mask
# buffers, RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


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


def _jobs(cfg: ModelConfig) -> list[tuple[str, int | None, families.Tensor]]:
  """(HF name, layer or None, tensor spec) for every tensor of the model, in file order."""
  model, layer = families.tensors(cfg)
  jobs = [(t.hf, None, t) for t in model]
  for i in range(cfg.num_layers):
    jobs += [(t.hf.format(i=i), i, t) for t in layer]
  return jobs


def _our_shapes(cfg: ModelConfig) -> dict:
  """Parameter tree of shapes, exactly model.Transformer's parameters."""
  import flax.linen as nn
  import jax

  from model.transformer import abstract_params

  return jax.tree.map(lambda x: tuple(x.shape), nn.unbox(abstract_params(cfg)))


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


# ---- HF -> ours -----------------------------------------------------------------------------
def read_hf_config(hf_dir: str) -> tuple[ModelConfig, dict]:
  """(our config, the config.json dict) of an HF checkpoint directory; EOS ids also from its
  generation_config.json (chat models end a turn on more than one id)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"{path}: not found (an HF checkpoint directory has config.json)")
  try:
    with open(path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: invalid JSON ({e})") from None
  try:
    cfg = families.config_from_hf(hf)
  except (KeyError, TypeError, ValueError) as e:
    what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
    raise ConversionError(f"{path}: {what}") from None
  gen_path = os.path.join(hf_dir, "generation_config.json")
  if os.path.exists(gen_path):
    try:
      with open(gen_path) as f:
        gen = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{gen_path}: invalid JSON ({e})") from None
    eos = gen.get("eos_token_id")
    ids = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
    extra = tuple(int(i) for i in ids if int(i) not in cfg.eos_ids)
    if extra:
      first = cfg.eos_token_id if cfg.eos_token_id is not None else extra[0]
      cfg = cfg.replace(
        eos_token_id=first,
        extra_eos_token_ids=tuple(i for i in cfg.extra_eos_token_ids + extra if i != first),
      )
  return cfg, hf


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


def hf_to_params(
  hf_dir: str, dtype: str | None = None, progress: bool = True
) -> tuple[ModelConfig, dict]:
  """Reads an HF checkpoint into (config, numpy param tree) one tensor at a time."""
  from safetensors import safe_open

  cfg, hf = read_hf_config(hf_dir)
  out_dtype = _np_dtype(dtype or hf.get("torch_dtype") or hf.get("dtype") or "float32")
  wmap, listing = _weight_map(hf_dir)
  jobs = _jobs(cfg)
  if not any(name.startswith(("transformer.", "model.")) for name in wmap):
    # a base model's checkpoint (GPTBigCodeModel, LlamaModel): names without the wrapper's prefix
    jobs = [(name.split(".", 1)[1] if "." in name else name, i, t) for name, i, t in jobs]
  expected = {j[0] for j in jobs}
  ignored = _IGNORED_SUFFIXES + (("lm_head.weight",) if cfg.tie_embeddings else ())
  for name in sorted(wmap):
    if name not in expected and not name.endswith(ignored):
      raise ConversionError(
        f"{wmap[name]}: unexpected tensor {name!r} for a {cfg.num_layers}-layer {cfg.family}"
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
        for name, layer, spec in file_jobs:
          shape = tuple(f.get_slice(name).get_shape())
          if shape != spec.shape:
            raise ConversionError(
              f"{file}: tensor {name!r} has shape {list(shape)}, config.json implies "
              f"{list(spec.shape)}"
            )
          values = spec.to_ours(f.get_tensor(name))
          for (path, index), v in zip(spec.targets, values):
            # numpy casts to the output dtype while copying, in small buffers
            where = index if layer is None else (layer, *index)
            _get(params, path if layer is None else ("h",) + path)[where] = v
          del values
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

  for name, layer, spec in _jobs(cfg):
    parts = []
    for path, index in spec.targets:
      full = np.asarray(_get(params, path if layer is None else ("h",) + path))
      parts.append(full[index if layer is None else (layer, *index)])
    yield name, cast(np.ascontiguousarray(spec.to_hf(*parts)))


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
  if ckpt_lib.is_checkpoint(ckpt_dir):
    try:  # refuse before loading anything: a setting the family's HF class cannot express
      families.config_to_hf(ckpt_lib.read_config(ckpt_dir))
    except families.UnsupportedError as e:
      raise ValueError(f"{ckpt_dir}: {e}") from None
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
      json.dump(families.config_to_hf(cfg, torch_dtype=out_dtype), f, indent=2)
    tok = ckpt_lib.tokenizer_path(ckpt_dir)
    if tok:
      ckpt_lib.copy_tree(tok, tmp)
    os.rename(tmp, final)
  except BaseException:
    ckpt_lib.remove_dir(tmp)
    raise
  return final


def expected_tensor_count(cfg: ModelConfig) -> int:
  model, layer = families.tensors(cfg)
  return len(model) + len(layer) * cfg.num_layers


def hf_param_bytes(cfg: ModelConfig, dtype="float32") -> int:
  import jax

  shapes = jax.tree.leaves(_our_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  return sum(math.prod(s) for s in shapes) * _np_dtype(dtype).itemsize
