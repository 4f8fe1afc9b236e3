"""Training metrics of `rrtf train` (rrtf_jax/stages/train.py): fetched from the devices a few
steps at a time, checked for a non-finite loss, written to TensorBoard and the progress bar.

  with MetricLogger(logdir, start=start, steps=steps, ...) as logger:
    logger.add(step, metrics, local_batch)   # device metrics, not fetched yet
    logger.flush()                           # every log_every steps and before each save

TensorBoard events go through tensorboardX, on an object store (gs://) through fsspec.
"""

from __future__ import annotations

import io
import math
import time
from typing import Callable

import jax

from data.loader import padding_fraction
from model.paths import is_url
from rrtf_jax.train_step import TrainError


class MetricLogger:
  """One process's metrics. Steps' device metrics wait in `pending` until `flush` fetches them
  in one device_get, so the host does not wait for the devices on every step.

  logdir: TensorBoard directory, None on the processes that do not write (all but process 0).
  start: the step the run starts from (a resumed run drops the events after it); steps: the
  last step. newest_checkpoint: the newest saved step, named when a loss is not finite.
  history: the fetched per-step rows of this run (host floats).
  """

  def __init__(
    self,
    logdir: str | None,
    *,
    start: int,
    steps: int,
    progress: bool,
    process_count: int,
    newest_checkpoint: Callable[[], int | None],
  ):
    from tqdm import tqdm

    self.writer = None
    if logdir:
      self.writer = _summary_writer(logdir, purge_step=start + 1 if start else None)
    self.bar = tqdm(
      total=steps,
      initial=start,
      desc="train",
      unit="step",
      disable=not progress,
      dynamic_ncols=True,
    )
    self.process_count, self.newest_checkpoint = process_count, newest_checkpoint
    self.history: list[dict] = []
    self.pending: list[tuple[int, dict, dict]] = []  # (step, device metrics, host figures)
    self.last_flush = time.perf_counter()

  def __enter__(self) -> MetricLogger:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def add(self, step: int, metrics: dict, batch: dict) -> None:
    """Queues `step`'s device metrics with figures of this host's batch (its [b, R, T] arrays)."""
    seg = batch["segment_ids"]  # [b, R, T]
    host = {
      "tokens": int(seg.sum()) * self.process_count,
      "seq_len": seg.shape[-1],
      "padding_fraction": padding_fraction(batch),
    }
    self.pending.append((step, metrics, host))

  def flush(self) -> None:
    """Fetches the pending metrics, stops on a non-finite loss, writes TensorBoard and the bar."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m, _ in self.pending])
    now = time.perf_counter()
    for (step, _, host), metrics in zip(self.pending, fetched):
      row = {k: float(v) for k, v in metrics.items()}
      if not math.isfinite(row["loss"]):
        raise TrainError(
          f"non-finite loss ({row['loss']}) at step {step}; stopping without saving "
          f"this step (the newest checkpoint is step {self.newest_checkpoint()})"
        )
      row.update(step=step, padding_fraction=host["padding_fraction"], seq_len=host["seq_len"])
      self.history.append(row)
      self._scalars(row, step)
    # Tokens (every host's, estimated from this one's) over the time since the last flush.
    rate = sum(host["tokens"] for _, _, host in self.pending) / max(now - self.last_flush, 1e-9)
    self.last_flush = now
    last_step = self.pending[-1][0]
    if self.writer is not None:
      self.writer.add_scalar("train/tokens_per_second", rate, last_step)
      self.writer.flush()
    r = self.history[-1]
    self.bar.set_postfix_str(
      f"loss {r['loss']:.4f} rank {r['rank_loss']:.4f} ft {r['ft_loss']:.2f} "
      f"acc {r['ranking_accuracy']:.2f} tok/s {rate:,.0f} pad {r['padding_fraction']:.2f}",
      refresh=False,
    )
    self.bar.update(last_step - self.bar.n)
    self.pending.clear()

  def _scalars(self, row: dict, step: int) -> None:
    if self.writer is not None:
      for k, v in row.items():
        if k != "step":
          self.writer.add_scalar(f"train/{k}", v, step)

  def close(self) -> None:
    self.bar.close()
    if self.writer is not None:
      self.writer.close()
      self.writer = None


class _ObjectStoreEventFile:
  """An event file on an object store (gs://) for tensorboardX, through fsspec/gcsfs like every
  other path here (tensorboardX's own gs:// writer needs google-cloud-storage). Objects cannot
  be appended to, so each flush uploads the whole file; metrics files stay small."""

  def __init__(self, path: str):
    self.path, self.buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    import fsspec

    with fsspec.open(self.path, "wb") as f:
      f.write(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _ObjectStoreEventFiles:
  def open(self, path: str) -> _ObjectStoreEventFile:
    return _ObjectStoreEventFile(path)

  def directory_check(self, path: str) -> None:  # object stores need no directories
    pass


def _summary_writer(logdir: str, purge_step: int | None):
  from tensorboardX import SummaryWriter
  from tensorboardX.record_writer import register_writer_factory

  if is_url(logdir):
    register_writer_factory(logdir.split("://", 1)[0], _ObjectStoreEventFiles())
  return SummaryWriter(logdir, purge_step=purge_step)
