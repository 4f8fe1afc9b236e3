"""The prepared dataset: what `rrtf prepare` writes and `rrtf train` reads.

Letters: R responses per prompt.

A ranked record (`rrtf rank`, data/records.py) becomes token ids in the paper's format: the
prompt between lines of triple double quotes (`prompt_text`), then each response as the
program that was executed, exec_prefix + code, and EOS. One record per problem:
  task_id           text
  tokens            [P + sum(L)] int32  prompt ids, then every response's ids
  prompt_length     int32               P
  response_lengths  [R] int32           L_i, each including its EOS
  scores            [R] float32         RRTF scores (higher is better)
  is_teacher        [R] int32
Shards are TFRecords named like TFDS shards of the dataset PREPARED_NAME, with TFDS metadata
(the longest prompt included) once every shard exists. The stage that writes them is
rrtf_jax/stages/prepare.py; the loader that reads them is data/loader.py.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data import records
from data.problems import InputError
from data.tokenizer import encode_prompt
from model.paths import is_url

PREPARED_NAME = "rrtf_prepared"  # the TFDS dataset name of `rrtf prepare` output
SPLIT = "train"


def features(encoder: bool = False):
  """The tfds FeaturesDict of a prepared record.

  With `encoder`, the lists are Tensor(shape=(None,)) instead of Sequence: the same bytes on
  disk (a test checks), encoded as whole arrays instead of one element at a time (much faster).
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds

  seq = (
    (lambda dt: tfds.features.Tensor(shape=(None,), dtype=dt))
    if encoder
    else tfds.features.Sequence
  )
  return tfds.features.FeaturesDict(
    {
      "task_id": tfds.features.Text(),
      "tokens": seq(tf.int32),
      "prompt_length": tf.int32,
      "response_lengths": seq(tf.int32),
      "scores": seq(tf.float32),
      "is_teacher": seq(tf.int32),
    }
  )


def prompt_text(prompt: str) -> str:
  """The paper's training prompt: the problem between triple quotes."""
  return '"""\n' + prompt.strip("\n") + '\n"""\n'


def prepare_record(record: dict, tokenizer) -> dict:
  """A ranked record -> a prepared record (token ids in the paper's format)."""
  eos = int(tokenizer.eos_id)
  prompt = encode_prompt(tokenizer, prompt_text(record["prompt"]))
  tokens, lengths = list(prompt), []
  for code in record["codes"]:
    ids = list(tokenizer.encode(record["exec_prefix"] + code)) + [eos]
    tokens += ids
    lengths.append(len(ids))
  return {
    "task_id": record["task_id"],
    "tokens": np.asarray(tokens, np.int32),
    "prompt_length": len(prompt),
    "response_lengths": np.asarray(lengths, np.int32),
    "scores": np.asarray(record["scores"], np.float32),
    "is_teacher": np.asarray(record["is_teacher"], np.int32),
  }


def serialize(example: dict, feats=None) -> bytes:
  """A prepared record as tf.train.Example bytes (`feats`: features(encoder=True))."""
  return records.deterministic((feats or features(encoder=True)).serialize_example(example))


def write_atomic(path: str, examples, feats=None) -> int:
  """Writes prepared records to `path` under a temporary name, renamed when complete."""
  feats = feats or features(encoder=True)
  return records.write_tfrecord_atomic(path, (serialize(ex, feats) for ex in examples))


def prompt_lengths(paths: Sequence[str]) -> np.ndarray:
  """[N] prompt_length of every record of local prepared shards, in order, reading only that
  field."""
  import tensorflow as tf

  if not paths:
    return np.zeros(0, np.int64)
  spec = {"prompt_length": tf.io.FixedLenFeature([], tf.int64)}
  ds = (
    tf.data.TFRecordDataset(list(paths))
    .batch(4096)
    .map(lambda x: tf.io.parse_example(x, spec)["prompt_length"])
  )
  return np.concatenate([np.zeros(0, np.int64), *ds.as_numpy_iterator()])


def write_metadata(out_dir: str, paths: Sequence[str]) -> None:
  """dataset_info.json, features.json and metadata.json (max_prompt_length) for complete shards
  (local or a URL: records.write_tfds_metadata)."""
  import tensorflow_datasets as tfds

  infos = None
  if is_url(out_dir):  # one download per shard for both its prompt lengths and its counts
    lengths, infos = [], []
    for path in paths:
      with records.local_copy(path) as local:
        lengths.append(prompt_lengths([local]))
        infos.append(records.shard_info(local))
    longest = max((int(x.max(initial=0)) for x in lengths), default=0)
  else:
    longest = int(prompt_lengths(paths).max(initial=0))
  records.write_tfds_metadata(
    out_dir,
    paths,
    features(),
    shard_infos=infos,
    metadata=tfds.core.MetadataDict(max_prompt_length=longest),
    description="RRTF training token ids (rrtf-jax `rrtf prepare`).",
  )


def open_prepared(data_dir: str):
  """The tfds builder of a prepared dataset, or a one-line InputError saying what it is instead."""
  # tf.io.gfile, not data/records.py's fsspec helpers: tfds reads the dataset through
  # TensorFlow anyway (real GCS: TensorFlow's gs:// filesystem; tested on local paths only,
  # since TensorFlow cannot reach the GCS emulator).
  import tensorflow as tf
  import tensorflow_datasets as tfds

  if not tf.io.gfile.isdir(data_dir):
    raise InputError(f"{data_dir}: no such directory")
  names = tf.io.gfile.listdir(data_dir)
  if any(n.startswith(records.RANKED_NAME + "-") for n in names):
    raise InputError(f"{data_dir}: looks like a ranked dataset; run `rrtf prepare` first")
  if "dataset_info.json" not in names:
    if any(n.startswith(PREPARED_NAME + "-") for n in names):
      raise InputError(
        f"{data_dir}: no TFDS metadata (dataset_info.json): not every `rrtf prepare` shard is done"
      )
    raise InputError(
      f"{data_dir}: not a prepared dataset (no {PREPARED_NAME} TFDS metadata); run `rrtf prepare`"
    )
  try:
    builder = tfds.builder_from_directory(data_dir)
  except Exception as e:  # noqa: BLE001  (tfds raises a variety of errors on damaged metadata)
    raise InputError(f"{data_dir}: unreadable TFDS metadata ({str(e).splitlines()[0]})") from None
  have = set(builder.info.features.keys())
  want = set(features().keys())
  if builder.info.name != PREPARED_NAME or not want <= have:
    raise InputError(
      f"{data_dir}: TFDS dataset {builder.info.name!r} is not an `rrtf prepare` output "
      f"(missing features {sorted(want - have)})"
    )
  if SPLIT not in builder.info.splits:
    raise InputError(f"{data_dir}: no {SPLIT!r} split")
  return builder


def dataset_size(data_dir: str) -> int:
  """Number of prompts in a prepared dataset (from its TFDS metadata)."""
  return int(open_prepared(data_dir).info.splits[SPLIT].num_examples)
