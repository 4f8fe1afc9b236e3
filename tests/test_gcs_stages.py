"""Every plain-Python stage with its inputs and outputs on gs://, against a real GCS emulator
(gcp-storage-emulator on 127.0.0.1, the `gcs_bucket` fixture), in this process: sample, rank,
prepare, evaluate and evolve. Each gs:// run is compared with the same stage on local paths
(the same bytes, TFDS metadata included), reruns skip finished files, and bad gs:// input
fails with a one-line error naming the file. `rrtf check` on gs:// is in test_rank.py;
convert, export and the train workdir in test_gcs.py and test_train.py.

The training reader (data/loader.py train_batches) reads through TensorFlow, whose own GCS
filesystem cannot reach the emulator: it is tested on local paths only (test_pipeline.py)."""

from __future__ import annotations

import json
import os

import pytest

from data import records
from data.problems import InputError

# gcsfs is imported only inside tests, after `gcs_bucket` has set the environment: it reads
# GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at import, and its default (gRPC) client hangs on the emulator.

SHORT = [  # problems short enough for the tiny model's positions
  ("add", "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n", "    assert candidate(1, 2) == 3\n"),
  ("neg", "def neg(x):\n    \"\"\"Return -x.\"\"\"\n", "    assert candidate(4) == -4\n"),
  ("one", "def one():\n    \"\"\"Return 1.\"\"\"\n    return 1\n", "    assert candidate() == 1\n"),
  (
    "first",
    "def first(xs):\n    \"\"\"The first item of xs.\"\"\"\n",
    "    assert candidate([5, 6]) == 5\n",
  ),
]


def _gcs():
  import gcsfs

  return gcsfs.GCSFileSystem(token="anon", project="test")


def _put(url: str, data: bytes | str) -> None:
  with _gcs().open(url, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)


def _gs_files(url: str) -> dict[str, bytes]:
  """name -> bytes of the objects directly under `url` (no 'directories')."""
  fs = _gcs()
  return {
    p.rsplit("/", 1)[-1]: fs.cat_file(p)
    for p in fs.ls(url, detail=False, refresh=True)
    if fs.isfile(p)
  }


def _local_files(d: str) -> dict[str, bytes]:
  return {
    n: open(os.path.join(d, n), "rb").read()
    for n in os.listdir(d)
    if os.path.isfile(os.path.join(d, n))
  }


def _problems_jsonl(rows=SHORT) -> str:
  return "".join(
    json.dumps(
      {
        "task_id": f"short/{i}",
        "prompt": prompt,
        "entry_point": name,
        "test": f"def check(candidate):\n{test}",
      }
    )
    + "\n"
    for i, (name, prompt, test) in enumerate(rows)
  )


@pytest.fixture(scope="module")
def student(tiny_ckpt):
  from model.decode import Decoder

  return Decoder.from_checkpoint(tiny_ckpt, chunk=8)


def test_sample_on_gcs(gcs_bucket, student, serve_teacher, tmp_path):
  """Problems, samples and the teacher cache on gs://; a rerun skips finished files and asks the
  teacher nothing twice; the files are byte-identical to a local run's. (Two files of the same
  shapes: the student compiles once.)"""
  from rrtf_jax.stages.sample import Teacher, output_files, sample_stage
  from rrtf_jax.serving.teacher import TeacherClient

  url, _ = serve_teacher
  root = f"{gcs_bucket}/sample"
  _put(f"{root}/problems.jsonl", _problems_jsonl())
  (tmp_path / "problems.jsonl").write_text(_problems_jsonl())

  def run(problems, out, **kw):
    with TeacherClient(
      url, "tiny-teacher", max_retries=0, timeout=60.0, cache_dir=f"{out}/.teacher-cache"
    ) as client:
      teacher = Teacher(client=client, samples=1, max_tokens=8)
      return sample_stage(
        problems,
        out,
        decoder=student,
        num_samples=2,
        temperatures=(0.0, 1.0),
        max_new_tokens=8,
        teacher=teacher,
        problems_per_file=2,
        progress=False,
        **kw,
      )

  out = f"{root}/out"
  first = run(f"{root}/problems.jsonl", out, shard=1, num_shards=2)
  assert first.files_done == [1] and first.teacher_requests == 2
  assert records.exists(output_files(out, 2)[1]) and not records.exists(output_files(out, 2)[0])
  rerun = run(f"{root}/problems.jsonl", out)
  assert rerun.files_done == [0] and rerun.files_skipped == [1] and rerun.teacher_requests == 2
  again = run(f"{root}/problems.jsonl", out)
  assert again.files_done == [] and again.files_skipped == [0, 1] and again.teacher_requests == 0
  assert len(_gcs().find(f"{out}/.teacher-cache")) == 4  # one cached answer per problem

  local = str(tmp_path / "out")
  run(str(tmp_path / "problems.jsonl"), local)
  got, want = _gs_files(out), _local_files(local)
  assert sorted(got) == sorted(want) == [os.path.basename(p) for p in output_files(out, 2)]
  assert got == want
  recs = list(records.read(output_files(out, 2)[0]))  # read back from gs://
  assert [r["task_id"] for r in recs] == ["short/0", "short/1"]
  assert recs[0]["sources"] == ["student", "student", "tiny-teacher"]


def _ranked_fixture_shards():
  from test_rank import _record

  return [
    [
      _record(
        "t0", ["right", "partial", "syntax"], [0, 0, 1]
      ),  # the student beats the teacher: dropped
      _record("t1", ["partial", "crash", "right"], [0, 0, 1]),
    ],
    [_record("t2", ["syntax", "right", "right"], [0, 0, 1])],
  ]


def test_rank_on_gcs(gcs_bucket, tmp_path):
  """Samples on gs:// -> ranked TFDS dataset on gs://, shard by shard (metadata once all
  exist), equal to ranking the same samples locally: records and metadata JSON."""
  from rrtf_jax.stages.rank import rank_stage

  samples, local_samples = f"{gcs_bucket}/rank/samples", str(tmp_path / "samples")
  os.makedirs(local_samples)
  shards = _ranked_fixture_shards()
  for j, recs in enumerate(shards):
    name = records.shard_name("rrtf_samples", "train", j, len(shards))
    records.write_atomic(f"{samples}/{name}", recs, ranked=False)  # the writer on gs:// too
    records.write_atomic(os.path.join(local_samples, name), recs, ranked=False)
  assert _gs_files(samples) == _local_files(local_samples)

  out = f"{gcs_bucket}/rank/ranked"
  s = rank_stage(samples, out, shard=1, num_shards=2, workers=2, progress=False)
  assert (
    s.shards_done == [1] and not s.metadata_written and "dataset_info.json" not in _gs_files(out)
  )
  s = rank_stage(samples, out, workers=2, progress=False)
  assert s.shards_done == [0] and s.shards_skipped == [1] and s.metadata_written
  s = rank_stage(samples, out, workers=2, progress=False)
  assert s.shards_done == [] and s.shards_skipped == [0, 1] and s.metadata_written

  local = str(tmp_path / "ranked")
  assert rank_stage(local_samples, local, workers=2, progress=False).metadata_written
  got, want = _gs_files(out), _local_files(local)
  assert sorted(got) == sorted(want) and {"dataset_info.json", "features.json"} <= set(got)
  assert got == want
  # t0 dropped
  assert json.loads(got["dataset_info.json"])["splits"][0]["shardLengths"] == ["1", "1"]

  # Bad input on gs:// fails in one line naming the object, and writes nothing.
  _put(
    f"{gcs_bucket}/rank/bad/rrtf_samples-train.tfrecord-00000-of-00001", b"this is not a tfrecord"
  )
  with pytest.raises(
    InputError,
    match=f"^{gcs_bucket}/rank/bad/rrtf_samples-train.tfrecord-00000-of-00001: "
    "not a readable TFRecord file",
  ) as e:
    rank_stage(f"{gcs_bucket}/rank/bad", f"{gcs_bucket}/rank/bad-out", workers=1, progress=False)
  assert "\n" not in str(e.value) and not _gcs().exists(f"{gcs_bucket}/rank/bad-out")
  with pytest.raises(InputError, match="no such directory"):
    rank_stage(f"{gcs_bucket}/rank/missing", out, progress=False)


def test_prepare_on_gcs(gcs_bucket, spm_dir, tmp_path):
  """A ranked dataset on gs:// (metadata written there) -> prepared dataset on gs://, with the
  tokenizer on gs:// too; files equal to the local run's, a rerun skips."""
  from data import prepared
  from rrtf_jax.stages import prepare
  from test_pipeline import _problem

  probs = [_problem(k) for k in range(5)]
  parts = [probs[:3], probs[3:]]
  ranked, local_ranked = f"{gcs_bucket}/prepare/ranked", str(tmp_path / "ranked")
  os.makedirs(local_ranked)
  for base in (ranked, local_ranked):
    for j, recs in enumerate(parts):
      records.write_atomic(
        f"{base}/{records.shard_name(records.RANKED_NAME, 'train', j, 2)}", recs, ranked=True
      )
    records.write_ranked_metadata(base)
  # the ranked metadata, written through a staging dir
  assert _gs_files(ranked) == _local_files(local_ranked)
  tokenizer = f"{gcs_bucket}/prepare/tokenizer"
  for name in os.listdir(spm_dir):
    _gcs().put_file(os.path.join(spm_dir, name), f"{tokenizer}/{name}")

  out = f"{gcs_bucket}/prepare/prepared"
  s = prepare.prepare_stage(ranked, out, tokenizer, shard=0, num_shards=2, progress=False)
  assert s.shards_done == [0] and not s.metadata_written
  s = prepare.prepare_stage(ranked, out, tokenizer, progress=False)
  assert s.shards_done == [1] and s.shards_skipped == [0] and s.metadata_written
  local = str(tmp_path / "prepared")
  assert prepare.prepare_stage(local_ranked, local, spm_dir, progress=False).metadata_written
  got, want = _gs_files(out), _local_files(local)
  assert {"dataset_info.json", "features.json", "metadata.json"} <= set(got)
  assert sorted(got) == sorted(want) and got == want
  prepared.open_prepared(local)  # what the local files are: a dataset the training reader opens

  with pytest.raises(InputError, match=f"^{gcs_bucket}/prepare/nothing: no such directory"):
    prepare.prepare_stage(f"{gcs_bucket}/prepare/nothing", out, tokenizer, progress=False)


def test_evaluate_on_gcs(gcs_bucket, student, tiny_ckpt, tmp_path):
  """gs:// problems in, parts and summary on gs://, two shards; results equal a local run's."""
  from rrtf_jax.stages.evaluate import evaluate

  problems, out = f"{gcs_bucket}/evaluate/problems.jsonl", f"{gcs_bucket}/evaluate/out"
  _put(problems, _problems_jsonl(SHORT[:2]))
  # 4 rows per part at 8 new tokens: the shapes test_sample_on_gcs compiled.
  kw = dict(
    n=4,
    temperature=0.8,
    max_new_tokens=8,
    problems_per_file=1,
    workers=2,
    decoder=student,
    progress=False,
  )
  s = evaluate(tiny_ckpt, problems, out, shard=1, num_shards=2, **kw)
  assert s.parts_sampled == [1] and s.summary is None
  s = evaluate(tiny_ckpt, problems, out, shard=0, num_shards=2, **kw)
  assert s.parts_sampled == [0] and s.summary is not None
  s = evaluate(tiny_ckpt, problems, out, **kw)
  assert s.parts_sampled == [] and s.parts_skipped == [0, 1]
  got = _gs_files(out)
  assert sorted(got) == ["report.md", "results.jsonl", "samples.jsonl", "summary.json"]
  assert json.loads(got["summary.json"])["settings"]["problems"] == problems

  (tmp_path / "p.jsonl").write_text(_problems_jsonl(SHORT[:2]))
  local = str(tmp_path / "out")
  evaluate(tiny_ckpt, str(tmp_path / "p.jsonl"), local, **kw)
  want = _local_files(local)
  assert (
    got["samples.jsonl"] == want["samples.jsonl"] and got["results.jsonl"] == want["results.jsonl"]
  )


def test_evolve_on_gcs(gcs_bucket, serve_teacher):
  """Seeds on gs://, the evolved problems, report and teacher cache on gs://; a rerun is
  answered from the cache. (The tiny teacher writes nonsense, so nothing is kept.)"""
  from rrtf_jax.stages.evolve import evolve_stage
  from rrtf_jax.serving.teacher import TeacherClient

  url, _ = serve_teacher
  seeds, out = f"{gcs_bucket}/evolve/seeds.jsonl", f"{gcs_bucket}/evolve/evolved.jsonl"
  _put(
    seeds,
    "".join(
      json.dumps(
        {"instruction": f"Write a function that returns {w} of a list.", "input": "", "output": ""}
      )
      + "\n"
      for w in ("the sum", "the max")
    ),
  )

  def run():
    with TeacherClient(
      url,
      "tiny-teacher",
      max_retries=0,
      timeout=60.0,
      cache_dir=f"{gcs_bucket}/evolve/.teacher-cache",
    ) as client:
      return evolve_stage(seeds, out, client, workers=2, max_tokens=8, progress=False)

  first = run()
  asked = first.teacher["requests"]
  assert asked >= 2 and first.teacher["cache_hits"] == 0
  got = _gs_files(f"{gcs_bucket}/evolve")
  assert (
    got["evolved.jsonl"] == b""
    and json.loads(got["evolved.jsonl.report.json"])["rounds"][0]["problems_in"] == 2
  )
  assert len(_gcs().find(f"{gcs_bucket}/evolve/.teacher-cache")) == asked
  again = run()
  assert again.teacher["requests"] == 0 and again.teacher["cache_hits"] == asked
