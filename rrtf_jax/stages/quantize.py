"""`rrtf quantize`: a model checkpoint -> a weight-only quantized checkpoint.

    rrtf quantize --ckpt models/rrtf --method int4-gptq --calibration train.jsonl \\
      --out models/rrtf-int4

The output is an ordinary checkpoint directory (model_config.json records quant_bits,
quant_group and quant_embedding) that `rrtf serve`, `rrtf evaluate` and `rrtf sample` load like
any other: the kernels stay int8/int4 in memory and are dequantized inside the layer that uses
them. quantization.json beside it records the method, the settings and, with calibration
prompts, each kernel's calibration loss next to round-to-nearest's.
"""

from __future__ import annotations

import dataclasses
import json

from data.problems import InputError
from data.tokenizer import encode_prompt


@dataclasses.dataclass
class QuantizeSummary:
  out: str
  method: str
  bytes_before: int
  bytes_after: int
  report: dict

  def text(self) -> str:
    lines = [
      f"wrote {self.out} ({self.method}): parameters {self.bytes_before / 2**20:.2f} MiB -> "
      f"{self.bytes_after / 2**20:.2f} MiB ({self.bytes_after / self.bytes_before:.1%})"
    ]
    if "calibration_error" in self.report:
      lines.append(
        "calibration loss (relative output error, mean over kernels): "
        f"{self.report['calibration_error']:.3e}"
        f"; round-to-nearest {self.report['rtn_calibration_error']:.3e}"
      )
    return "\n".join(lines)


def calibration_tokens(spec: str, tokenizer, *, max_prompts: int, seq_len: int):
  """Tokens and mask [N, T] (right-padded, cut at seq_len) of the first max_prompts problems'
  prompts as the student sees them (`humaneval` or a problems JSONL, as `rrtf sample` reads)."""
  import numpy as np

  from rrtf_jax.stages.sample import load_problems

  problems = load_problems(spec)[:max_prompts]
  if not problems:
    raise InputError(f"{spec}: no calibration problems")
  ids = [encode_prompt(tokenizer, p.student_text())[:seq_len] for p in problems]
  t = max(map(len, ids))
  tokens, mask = np.zeros((len(ids), t), np.int32), np.zeros((len(ids), t), np.int32)
  for i, row in enumerate(ids):
    tokens[i, : len(row)], mask[i, : len(row)] = row, 1
  return tokens, mask


def quantize_stage(
  ckpt: str,
  method: str,
  out: str,
  *,
  calibration: str | None = None,
  group: int | None = None,
  embedding: bool = False,
  dtype: str = "bfloat16",
  max_prompts: int = 128,
  seq_len: int = 512,
  progress: bool = True,
) -> QuantizeSummary:
  import jax

  from data.tokenizer import resolve_tokenizer
  from model.checkpoint import (
    QUANTIZATION_FILE,
    check_output,
    is_checkpoint,
    load_checkpoint,
    param_bytes,
    read_config,
    save_checkpoint,
    tokenizer_path,
  )
  from model.quantize import quantize_params, quantized_config

  check_output(out)
  if not is_checkpoint(ckpt):
    raise FileNotFoundError(f"{ckpt}: not a model checkpoint (no model_config.json)")
  cfg = read_config(ckpt)
  if cfg.quant_bits:
    raise InputError(f"{ckpt}: quantized already; quantize the full-precision checkpoint")
  quantized_config(cfg, method, group, embedding, dtype)  # settings errors before any loading
  if method.endswith("gptq") and not calibration:
    raise InputError(
      "int4-gptq needs calibration prompts: --calibration FILE (problems JSONL, e.g. the "
      "training problems)"
    )
  tok_dir = tokenizer_path(ckpt)
  calib = None
  if calibration:
    if tok_dir is None:
      raise InputError(f"{ckpt}: --calibration needs a checkpoint with its tokenizer")
    calib = calibration_tokens(
      calibration, resolve_tokenizer(tok_dir), max_prompts=max_prompts, seq_len=seq_len
    )
  with jax.default_device(jax.devices("cpu")[0]):  # host memory: the model need not fit a device
    cfg, params = load_checkpoint(ckpt)
  qcfg, qparams, report = quantize_params(
    cfg,
    params,
    method,
    group=group,
    embedding=embedding,
    dtype=dtype,
    calibration=calib,
    progress=progress,
  )
  record = {
    "method": method,
    "source": ckpt,
    "bits": qcfg.quant_bits,
    "group": qcfg.quant_group,
    "embedding": "int8" if embedding else dtype,
    "dtype": dtype,
    "calibration": calibration,
    "calibration_prompts": None if calib is None else len(calib[0]),
    **report,
  }
  path = save_checkpoint(
    out,
    qcfg,
    qparams,
    tokenizer_dir=tok_dir,
    extra_files={QUANTIZATION_FILE: json.dumps(record, indent=2)},
  )
  return QuantizeSummary(path, method, param_bytes(params), param_bytes(qparams), record)
