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
  scores         [R] float RRTF score, higher is better (see rrtf_jax/stages/rank.py)

Paths may be local or URLs (gs://): `exists`, `isdir`, `listdir`, `makedirs`, `local_copy`,
`write_tfrecord_atomic` and `write_tfds_metadata` (bottom of this file) are what the sample,
rank and prepare stages use for every file, through fsspec (gcsfs) for URLs.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from data.problems import InputError
from model.paths import is_url

TEXT_FIELDS = ("task_id", "prompt", "test", "entry_point", "exec_prefix")
SAMPLE_LISTS = {"responses": "text", "codes": "text", "sources": "text", "is_teacher": "int"}
RANKED_LISTS = {
  **SAMPLE_LISTS,
  "outcomes": "text",
  "tests_passed": "int",
  "tests_total": "int",
  "scores": "float",
}
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
    raise ValueError(
      f"{where} ({record['task_id']}): per-response fields differ in length: {sizes}"
    )


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
  for data in tfrecord_payloads(path):
    yield parse(data, ranked)


def tfrecord_payloads(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file, local or a URL (read from a local copy: `local_copy`)."""
  import tensorflow as tf

  with local_copy(path) as local:
    yield from tf.data.TFRecordDataset(local).as_numpy_iterator()


def write_atomic(path: str, records: Iterable[dict], ranked: bool) -> int:
  """Writes samples or ranked records to `path` atomically (`write_tfrecord_atomic`)."""
  feats = features(ranked)
  return write_tfrecord_atomic(path, (serialize(record, ranked, feats) for record in records))


def write_tfrecord_atomic(path: str, serialized: Iterable[bytes]) -> int:
  """Writes the TFRecord file `path` (local or a URL) so that it appears only when complete;
  returns the record count. Locally it is written under a temporary name and renamed: a
  killed write leaves only the temporary file, which the next attempt overwrites. A URL's
  file is written to a local temporary file and uploaded to its name: an object store
  (gs://) publishes an object only once its upload completes."""
  import tensorflow as tf

  def write(local: str) -> int:
    n = 0
    with tf.io.TFRecordWriter(local) as w:
      for data in serialized:
        w.write(data)
        n += 1
    return n

  if is_url(path):
    fs, target = _fs(path)
    with tempfile.TemporaryDirectory(prefix="rrtf-") as d:
      local = os.path.join(d, posixpath.basename(target))
      n = write(local)
      fs.put_file(local, target)
    return n
  tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
  n = write(tmp)
  os.replace(tmp, path)
  return n


def shard_name(name: str, split: str, index: int, count: int) -> str:
  """TFDS's default file naming, which `write_metadata` recognises."""
  return f"{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"


def write_ranked_metadata(out_dir: str, description: str = "") -> None:
  """dataset_info.json + features.json for the complete shards in `out_dir` (local or a URL)."""
  paths = [
    posixpath.join(out_dir, n)
    for n in sorted(listdir(out_dir))
    if n.startswith(RANKED_NAME + "-") and ".tfrecord-" in n
  ]
  write_tfds_metadata(
    out_dir,
    paths,
    features(ranked=True),
    description=description or "RRTF ranked responses (rrtf-jax `rrtf rank`).",
  )


# ------------------------------------------------------------------- TFDS metadata on any path


def shard_info(path: str) -> tuple[int, int]:
  """(records, payload bytes) of a TFRecord file: what tfds counts per shard for its split info."""
  import tensorflow as tf

  with local_copy(path) as local:
    ds = tf.data.TFRecordDataset(local).map(lambda x: tf.strings.length(x)).batch(4096)
    sizes = np.concatenate(
      [np.zeros(0, np.int64), *(b.astype(np.int64) for b in ds.as_numpy_iterator())]
    )
  return len(sizes), int(sizes.sum())


def write_tfds_metadata(
  out_dir: str,
  paths: Sequence[str],
  feats,
  *,
  shard_infos: Sequence[tuple[int, int]] | None = None,
  **info,
) -> None:
  """tfds.folder_dataset.write_metadata (dataset_info.json, features.json, ...; `info`: its
  DatasetInfo arguments) for the complete TFDS-named TFRecord shards `paths` of `out_dir`.

  Locally tfds reads the shards itself. tfds reaches a URL only through tf.io.gfile (which,
  among other things, cannot reach a GCS emulator), so for a URL the metadata is built in a
  local staging directory holding empty stand-ins of the shards (tfds finds the splits by
  file name) with split infos from `shard_infos` ((records, payload bytes) per path, as
  `shard_info` counts them, which is what tfds counts), and then uploaded, dataset_info.json
  last: the files are the same as a local run's."""
  import io

  import tensorflow_datasets as tfds

  def write(data_dir: str, **kw) -> None:
    # It narrates split detection on stdout and may draw a progress bar on stderr.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      tfds.folder_dataset.write_metadata(
        data_dir=data_dir, features=feats, check_data=False, **kw, **info
      )

  if not is_url(out_dir):
    write(out_dir)
    return
  from tensorflow_datasets.core import naming

  if shard_infos is None:
    shard_infos = [shard_info(p) for p in paths]
  names = [posixpath.basename(p) for p in paths]
  fs, target = _fs(out_dir)
  with tempfile.TemporaryDirectory(prefix="rrtf-metadata-") as d:
    # The same directory name: tfds takes the version from it when it is one ("1.0.0").
    staging = os.path.join(d, posixpath.basename(target.rstrip("/")) or "dataset")
    os.makedirs(staging)
    for name in names:
      open(os.path.join(staging, name), "wb").close()
    template = naming.ShardedFileTemplate(
      data_dir=staging, template=naming.DEFAULT_FILENAME_TEMPLATE
    )
    shards: dict[str, list] = {}
    for name, counts in zip(names, shard_infos):
      fi = template.parse_filename_info(name)
      if fi is None:
        raise ValueError(f"{posixpath.join(out_dir, name)}: not a TFDS shard name")
      shards.setdefault(fi.split, []).append((fi, counts))
    split_infos = []
    for split, items in sorted(shards.items()):
      items.sort(key=lambda item: item[0].shard_index)
      fi = items[0][0]
      split_infos.append(
        tfds.core.SplitInfo(
          name=split,
          shard_lengths=[n for _, (n, _) in items],
          num_bytes=sum(b for _, (_, b) in items),
          filename_template=template.replace(
            dataset_name=fi.dataset_name, split=split, filetype_suffix=fi.filetype_suffix
          ),
        )
      )
    write(staging, split_infos=split_infos)
    written = sorted(
      (n for n in os.listdir(staging) if n not in names), key=lambda n: n == "dataset_info.json"
    )
    for name in written:
      fs.put_file(os.path.join(staging, name), posixpath.join(target, name))


# ------------------------------------------------------- paths: local, or a URL through fsspec
# The stages' files go through these: local paths as before (os, tf.io on local files), URLs
# (gs://: gcsfs, which honours STORAGE_EMULATOR_HOST) through fsspec. tf.io.gfile is not
# used: TensorFlow's GCS client cannot reach a GCS emulator and has its own credentials.


def _fs(path: str):
  """(fsspec filesystem, path within it) of a URL."""
  import fsspec

  return fsspec.core.url_to_fs(str(path))


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  fs, target = _fs(path)
  fs.invalidate_cache(target)  # another process may have written it since a listing was cached
  return fs.exists(target)


def check_shard(shard: int, num_shards: int) -> None:
  """`--shard i --num-shards n`, as every sharded stage takes them."""
  if not 0 <= shard < num_shards:
    raise InputError(f"--shard {shard} is not in [0, --num-shards {num_shards})")


def shard_plan(outputs: Sequence[str], shard: int, num_shards: int) -> tuple[list[int], list[int]]:
  """This process's output files shard, shard + num_shards, ... of `outputs`, split into (still
  to write, written already): a stage writes a file only when it is complete."""
  check_shard(shard, num_shards)
  todo, done = [], []
  for j in range(shard, len(outputs), num_shards):
    (done if exists(outputs[j]) else todo).append(j)
  return todo, done


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(path)
  fs, target = _fs(path)
  fs.invalidate_cache(target)
  return fs.isdir(target)


def listdir(path: str) -> list[str]:
  """The names in a directory (on an object store: under a prefix, one level)."""
  if not is_url(path):
    return os.listdir(path)
  fs, target = _fs(path)
  return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(target, detail=False, refresh=True)]


def makedirs(path: str) -> None:
  """os.makedirs locally; fsspec's makedirs for a URL (object stores have no real directories)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    return
  fs, target = _fs(path)
  fs.makedirs(target, exist_ok=True)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local path with the contents of `path`: itself when local; for a URL a temporary
  download, removed on exit (tf.data reads local files; see the note above)."""
  if not is_url(path):
    yield path
    return
  fs, target = _fs(path)
  with tempfile.TemporaryDirectory(prefix="rrtf-") as d:
    local = os.path.join(d, posixpath.basename(target.rstrip("/")))
    fs.get_file(target, local)
    yield local
