"""Weight-only quantization of a linear layer's kernel [D_in, D_out] (the first step of issue 10).

  int8       per output channel, symmetric: q in [-127, 127], w ~ q * scale[D_out]
  int4 RTN   groups of `group` input rows, symmetric: q in [-8, 7], w ~ q * scale[G, D_out]
  int4 GPTQ  the same format; rows are rounded in order and each rounding error is spread over
             the rows not yet rounded, weighted by the inverse Hessian H = 2 X^T X of the
             calibration inputs X [N, D_in] (Frantar et al. 2022, arXiv 2210.17323)

GPTQ minimises the layer's output error ||X W - X Q||^2 on the calibration inputs, which
round-to-nearest does not look at. Computed in float64 NumPy on the host: quantizing is a one-off.
"""

from __future__ import annotations

import dataclasses

import numpy as np


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


def _qmax(bits: int) -> int:
  return 2 ** (bits - 1) - 1  # 127 for int8, 7 for int4 (and -8 allowed below)


def _check(w: np.ndarray, group: int | None) -> int:
  if w.ndim != 2:
    raise ValueError(f"a kernel must be [D_in, D_out], got shape {w.shape}")
  group = group or w.shape[0]
  if w.shape[0] % group:
    raise ValueError(f"group {group} does not divide D_in {w.shape[0]}")
  return group


def _scales(w: np.ndarray, group: int, bits: int) -> np.ndarray:
  g = w.shape[0] // group
  amax = np.abs(w.reshape(g, group, -1)).max(axis=1)  # [G, D_out]
  return np.where(amax > 0, amax / _qmax(bits), 1.0).astype(np.float32)


def _round(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
  return np.clip(np.rint(w / scale), -_qmax(bits) - 1, _qmax(bits)).astype(np.int8)


def quantize_rtn(w, bits: int = 8, group: int | None = None) -> Quantized:
  """Round to nearest: per output channel (group None) or per `group` input rows."""
  w = np.asarray(w, np.float32)
  group = _check(w, group)
  scale = _scales(w, group, bits)
  q = _round(w.reshape(scale.shape[0], group, -1), scale[:, None, :], bits).reshape(w.shape)
  return Quantized(q, scale, bits)


def quantize_gptq(w, x, bits: int = 4, group: int | None = None, damp: float = 0.01) -> Quantized:
  """GPTQ with the scales of round-to-nearest per group; x: calibration inputs [N, D_in]."""
  w = np.asarray(w, np.float64)
  x = np.asarray(x, np.float64).reshape(-1, w.shape[0])
  group = _check(w, group)
  scale = _scales(w, group, bits).astype(np.float64)
  d_in = w.shape[0]
  h = 2.0 * x.T @ x
  dead = np.diag(h) == 0  # inputs never active: their rows cannot matter to the output
  h[dead, dead] = 1.0
  h += damp * np.mean(np.diag(h)) * np.eye(d_in)
  # Upper Cholesky factor of H^-1: row i holds the weights that spread row i's error.
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  w = w.copy()
  q = np.zeros(w.shape, np.int8)
  for i in range(d_in):
    s = scale[i // group]
    q[i] = _round(w[i], s, bits)
    err = (w[i] - q[i] * s) / u[i, i]
    w[i + 1:] -= np.outer(u[i, i + 1:], err)
  return Quantized(q, scale.astype(np.float32), bits)


def output_error(w, quantized: Quantized, x) -> float:
  """Mean squared error of the layer's outputs on inputs x: ||x W - x W_q||^2 / N."""
  x = np.asarray(x, np.float64).reshape(-1, quantized.q.shape[0])
  diff = x @ (np.asarray(w, np.float64) - quantized.dequantize())
  return float(np.mean(np.sum(diff * diff, axis=-1)))
