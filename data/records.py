"""TFRecord schemas of the sampling and ranking stages, and their writers and readers.

One record per problem, its R responses kept together (the RRTF loss ranks them against
each other). Records are `tf.train.Example`s serialised by the tfds feature connectors
below, so the ranked output is a TFDS dataset (`tfds.builder_from_directory(out)`).

Samples (written by `rrtf sample`, read by `rrtf rank`):
  task_id        text      problem id
  prompt         text      what the model was given (the training prompt)
  test           text      unit tests: top-level asserts and/or `def check(candidate)`
  entry_point    text      the function the tests call
  exec_prefix    text      code run before each response's code: the HumanEval prompt for
                           completion-style problems, empty for instruction-style ones
  responses      [R] text  model outputs, as trained on
  codes          [R] text  the code extracted from each response; program = exec_prefix + code
  sources        [R] text  model name that produced each response
  is_teacher     [R] int   1 for teacher responses, 0 for the student's
Ranked (written by `rrtf rank`) adds, per response:
  outcomes       [R] text  syntax_error | runtime_error | timeout | wrong_answer | passed
  tests_passed   [R] int   assertions passed
  tests_total    [R] int   assertions in the tests (0 when the program did not load)
  scores         [R] float RRTF score, higher is better (see rrtf_jax/rank.py)
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

TEXT_FIELDS = ("task_id", "prompt", "test", "entry_point", "exec_prefix")
SAMPLE_LISTS = {"responses": "text", "codes": "text", "sources": "text", "is_teacher": "int"}
RANKED_LISTS = {**SAMPLE_LISTS, "outcomes": "text", "tests_passed": "int", "tests_total": "int",
                "scores": "float"}
RANKED_NAME = "rrtf_ranked"  # the TFDS dataset name of `rrtf rank` output


def features(ranked: bool):
  """The tfds FeaturesDict of a samples (ranked=False) or ranked record."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  kinds = {"text": tfds.features.Text(), "int": tf.int64, "float": tf.float32}
  spec = {name: tfds.features.Text() for name in TEXT_FIELDS}
  for name, kind in (RANKED_LISTS if ranked else SAMPLE_LISTS).items():
    spec[name] = tfds.features.Sequence(kinds[kind])
  return tfds.features.FeaturesDict(spec)


def validate(record: dict, ranked: bool, where: str = "record") -> None:
  lists = RANKED_LISTS if ranked else SAMPLE_LISTS
  for name in TEXT_FIELDS:
    if not isinstance(record.get(name), str):
      raise ValueError(f"{where}: field {name!r} must be a string")
  sizes = {name: len(record.get(name) or ()) for name in lists}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"{where} ({record['task_id']}): per-response fields differ in length: {sizes}")


def serialize(record: dict, ranked: bool, feats=None) -> bytes:
  validate(record, ranked)
  feats = feats or features(ranked)
  names = TEXT_FIELDS + tuple(RANKED_LISTS if ranked else SAMPLE_LISTS)
  return deterministic(feats.serialize_example({name: record[name] for name in names}))


def deterministic(example_bytes: bytes) -> bytes:
  """Re-serialises a tf.train.Example with sorted map keys: protobuf map order varies between
  processes, and reruns must be byte-identical."""
  import tensorflow as tf
  return tf.train.Example.FromString(example_bytes).SerializeToString(deterministic=True)


def parse(data: bytes, ranked: bool) -> dict:
  """A serialised record back to Python values (str, list[str], list[int], list[float])."""
  import tensorflow as tf
  ex = tf.train.Example.FromString(data).features.feature
  out = {}
  for name in TEXT_FIELDS:
    values = ex[name].bytes_list.value
    out[name] = values[0].decode() if values else ""
  for name, kind in (RANKED_LISTS if ranked else SAMPLE_LISTS).items():
    f = ex[name]
    if kind == "text":
      out[name] = [v.decode() for v in f.bytes_list.value]
    elif kind == "int":
      out[name] = [int(v) for v in f.int64_list.value]
    else:
      out[name] = [float(np.float32(v)) for v in f.float_list.value]
  return out


def read(path: str, ranked: bool = False) -> Iterator[dict]:
  import tensorflow as tf
  for data in tf.data.TFRecordDataset(path).as_numpy_iterator():
    yield parse(data, ranked)


def write_atomic(path: str, records: Iterable[dict], ranked: bool) -> int:
  """Writes samples or ranked records to `path` atomically (`write_tfrecord_atomic`)."""
  feats = features(ranked)
  return write_tfrecord_atomic(path, (serialize(record, ranked, feats) for record in records))


def write_tfrecord_atomic(path: str, serialized: Iterable[bytes]) -> int:
  """Writes `path` under a temporary name and renames it when complete; returns the count.
  A killed write leaves only the temporary file, which the next attempt overwrites."""
  import tensorflow as tf
  tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
  n = 0
  with tf.io.TFRecordWriter(tmp) as w:
    for data in serialized:
      w.write(data)
      n += 1
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return n


def shard_name(name: str, split: str, index: int, count: int) -> str:
  """TFDS's default file naming, which `write_metadata` recognises."""
  return f"{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def write_ranked_metadata(out_dir: str, description: str = "") -> None:
  """dataset_info.json + features.json for the complete shards in `out_dir`."""
  import contextlib
  import io

  import tensorflow_datasets as tfds
  with contextlib.redirect_stdout(io.StringIO()):  # it narrates split detection on stdout
    tfds.folder_dataset.write_metadata(
        data_dir=out_dir, features=features(ranked=True), check_data=False,
        description=description or "RRTF ranked responses (rrtf-jax `rrtf rank`).")
