"""Model checkpoints: a directory with the config, the parameters (orbax) and the tokenizer.

  DIR/model_config.json   ModelConfig fields
  DIR/params/             orbax StandardCheckpointer tree (stacked layers under `h`)
  DIR/tokenizer/          tokenizer files (tokenizer.json or a SentencePiece model), optional

Paths may be local or gs://. Writers build the directory under a temporary sibling name and
rename it when complete, so a killed run never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import jax
import numpy as np
import orbax.checkpoint as ocp

from model.config import ModelConfig

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def _is_url(path: str) -> bool:
  return "://" in str(path)


def abspath(path: str) -> str:
  path = str(path)
  return path.rstrip("/") if _is_url(path) else os.path.abspath(path)


def fs_for(path: str):
  fs, _ = fsspec.core.url_to_fs(str(path))
  return fs


def temp_sibling(path: str) -> str:
  return f"{abspath(path)}.tmp-{uuid.uuid4().hex[:8]}"


def commit_dir(tmp: str, final: str) -> None:
  """Renames a finished temporary directory to its final name (replacing nothing)."""
  fs = fs_for(final)
  if fs.exists(final):
    raise FileExistsError(f"{final} already exists")
  if _is_url(final):
    fs.mv(tmp, final, recursive=True)
  else:
    os.rename(tmp, final)


def remove_dir(path: str) -> None:
  fs = fs_for(path)
  if fs.exists(path):
    fs.rm(path, recursive=True)


def is_checkpoint(path: str) -> bool:
  return fs_for(path).exists(f"{abspath(path)}/{CONFIG_FILE}")


def read_config(path: str) -> ModelConfig:
  with fsspec.open(f"{abspath(path)}/{CONFIG_FILE}", "r") as f:
    return ModelConfig.from_dict(json.load(f))


def write_params(path: str, params) -> None:
  """Writes a parameter tree (numpy or jax arrays) to PATH/params with orbax, synchronously.

  orbax's default numpy handler deep-copies host arrays before an async save, which would
  double peak host memory during conversion (31 GB more for StarCoder-15B in bf16); the
  arrays here are not mutated while saving, so that copy is switched off.
  """
  from orbax.checkpoint import type_handlers as th
  registry = th.create_type_handler_registry(
      (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)), (jax.Array, th.ArrayHandler()))
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
  ckptr.save(f"{abspath(path)}/{PARAMS_DIR}", args=ocp.args.PyTreeSave(params))


def save_checkpoint(path: str, config: ModelConfig, params, tokenizer_dir: str | None = None) -> str:
  """Writes a complete checkpoint directory atomically; returns its path."""
  final = abspath(path)
  tmp = temp_sibling(final)
  try:
    fs = fs_for(tmp)
    fs.makedirs(tmp, exist_ok=True)
    with fsspec.open(f"{tmp}/{CONFIG_FILE}", "w") as f:
      f.write(config.to_json())
    if tokenizer_dir:
      copy_tree(tokenizer_dir, f"{tmp}/{TOKENIZER_DIR}")
    write_params(tmp, params)
    commit_dir(tmp, final)
  except BaseException:
    remove_dir(tmp)
    raise
  return final


def copy_tree(src: str, dst: str) -> None:
  """Copies the files of a flat directory (tokenizer files) between any two filesystems."""
  sfs, dfs = fs_for(src), fs_for(dst)
  dfs.makedirs(dst, exist_ok=True)
  for name in sorted(sfs.ls(abspath(src), detail=False)):
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if sfs.isdir(name):
      continue
    with sfs.open(name, "rb") as fi, dfs.open(f"{dst}/{base}", "wb") as fo:
      fo.write(fi.read())


def load_checkpoint(path: str, *, shardings=None, dtype=None):
  """Reads a checkpoint directory -> (ModelConfig, params).

  Args:
    path: a directory written by `save_checkpoint` / `rrtf convert`.
    shardings: optional tree of `jax.sharding.Sharding` matching the params: each host then
      reads only its shards (large models on a pod). Without it arrays land on the default device.
    dtype: optional dtype to cast the restored parameters to.
  """
  path = abspath(path)
  if not is_checkpoint(path):
    raise FileNotFoundError(f"{path}: not a model checkpoint (no {CONFIG_FILE})")
  config = read_config(path)
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(f"{path}/{PARAMS_DIR}").item_metadata.tree
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, meta)
  target = jax.tree.map(
      lambda m, s: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s), meta, shardings)
  params = ckptr.restore(f"{path}/{PARAMS_DIR}", target)
  return config, params


def tokenizer_path(path: str) -> str | None:
  p = f"{abspath(path)}/{TOKENIZER_DIR}"
  return p if fs_for(p).exists(p) else None


def param_bytes(params) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
