"""Model checkpoints: a directory with the config, the parameters (orbax) and the tokenizer.

  DIR/model_config.json   ModelConfig fields
  DIR/params/             orbax StandardCheckpointer tree (stacked layers under `h`)
  DIR/tokenizer/          tokenizer files (tokenizer.json or a SentencePiece model), optional

Paths may be local or gs://. A killed write never leaves a directory that looks finished
(see `save_checkpoint`).
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
from model.paths import abspath, is_url

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
QUANTIZATION_FILE = "quantization.json"  # how a quantized checkpoint was made (rrtf quantize)


def fs_for(path: str):
  fs, _ = fsspec.core.url_to_fs(str(path))
  return fs


def temp_sibling(path: str) -> str:
  return f"{abspath(path)}.tmp-{uuid.uuid4().hex[:8]}"


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
    (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)), (jax.Array, th.ArrayHandler())
  )
  ckptr = ocp.Checkpointer(
    ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=use_ocdbt())
  )
  ckptr.save(f"{abspath(path)}/{PARAMS_DIR}", args=ocp.args.PyTreeSave(params))


def use_ocdbt() -> bool:
  """OCDBT (one database per checkpoint instead of a directory per array) is orbax's default;
  RRTF_ORBAX_OCDBT=0 turns it off (tests on gcp-storage-emulator, which serves some OCDBT
  manifest reads with generations tensorstore rejects)."""
  return os.environ.get("RRTF_ORBAX_OCDBT", "1") != "0"


def check_output(path: str) -> None:
  """Refuses to overwrite a checkpoint or an unrelated directory; clears a killed write's
  leftovers."""
  final = abspath(path)
  fs = fs_for(final)
  if not fs.exists(final):
    return
  if is_checkpoint(final):
    raise FileExistsError(f"{final}: output already exists")
  names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(final, detail=False)}
  if is_url(final) and names <= {PARAMS_DIR, TOKENIZER_DIR, QUANTIZATION_FILE}:
    remove_dir(final)  # an object-store write that was killed before its config (the commit marker)
    return
  raise FileExistsError(f"{final}: output already exists and is not a checkpoint")


def save_checkpoint(
  path: str,
  config: ModelConfig,
  params,
  tokenizer_dir: str | None = None,
  tokenizer_files: tuple[str, ...] = (),
  extra_files: dict[str, str] | None = None,
) -> str:
  """Writes a complete checkpoint directory; returns its path. `extra_files`: name -> text of
  files written beside the config (e.g. quantization.json).

  Local paths are written under a temporary sibling and renamed when complete. On object
  stores (gs://), where a rename is a copy, the directory is written in place with
  model_config.json last: a directory without it is an unfinished write, which
  `check_output` clears on the next attempt and `load_checkpoint` refuses.
  """
  check_output(path)
  final = abspath(path)
  work = final if is_url(final) else temp_sibling(final)
  try:
    fs = fs_for(work)
    fs.makedirs(work, exist_ok=True)
    if tokenizer_dir or tokenizer_files:
      tok = f"{work}/{TOKENIZER_DIR}"
      fs.makedirs(tok, exist_ok=True)
      if tokenizer_dir:
        copy_tree(tokenizer_dir, tok)
      for src in tokenizer_files:
        _copy_file(src, f"{tok}/{os.path.basename(src)}")
    write_params(work, params)
    for name, text in (extra_files or {}).items():
      with fsspec.open(f"{work}/{name}", "w") as f:
        f.write(text)
    with fsspec.open(f"{work}/{CONFIG_FILE}", "w") as f:
      f.write(config.to_json())
    if work != final:
      os.rename(work, final)
  except BaseException:
    remove_dir(work)
    raise
  return final


def _copy_file(src: str, dst: str) -> None:
  with fsspec.open(src, "rb") as fi, fsspec.open(dst, "wb") as fo:
    fo.write(fi.read())


def copy_tree(src: str, dst: str) -> None:
  """Copies the files of a flat directory (tokenizer files) between any two filesystems."""
  sfs = fs_for(src)
  fs_for(dst).makedirs(dst, exist_ok=True)
  for name in sorted(sfs.ls(abspath(src), detail=False)):
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if not sfs.isdir(name):
      _copy_file(sfs.unstrip_protocol(name), f"{dst}/{base}")


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
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: dev, meta)

  # `dtype` casts the floating-point parameters only (a quantized checkpoint's integers stay).
  def restored(m, sharding):
    cast = dtype and jax.numpy.issubdtype(m.dtype, jax.numpy.floating)
    return jax.ShapeDtypeStruct(m.shape, dtype if cast else m.dtype, sharding=sharding)

  target = jax.tree.map(restored, meta, shardings)
  params = ckptr.restore(f"{path}/{PARAMS_DIR}", target)
  return config, params


def tokenizer_path(path: str) -> str | None:
  p = f"{abspath(path)}/{TOKENIZER_DIR}"
  return p if fs_for(p).exists(p) else None


def param_bytes(params) -> int:
  """Bytes of a parameter tree as an accelerator holds it: int4 packs two values per byte."""

  def nbytes(x) -> int:
    n = int(np.prod(x.shape))
    return (
      (n + 1) // 2
      if np.dtype(x.dtype) == np.dtype(jax.numpy.int4)
      else n * np.dtype(x.dtype).itemsize
    )

  return sum(nbytes(x) for x in jax.tree.leaves(params))
