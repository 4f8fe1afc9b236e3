"""`rrtf demo`: the whole RRTF loop on CPU in minutes, with a measured before and after.

Every stage runs the code a pod runs (`rrtf sample`, `rank`, `prepare`, `train`,
`evaluate`); only the sizes are small:

 1. problems    data.synthetic: seeded HumanEval-format problems, split into warm-up,
                RRTF-training and held-out problems that share no instance.
 2. tokenizer   the tiny config's SentencePiece, trained on the warm-up and training text.
 3. warm-up     plain fine-tuning (R = 1) of the randomly initialised tiny model on the
                warm-up problems' reference solutions, run through sample (the references
                as a teacher file, no student samples), rank and prepare; a stand-in for a
                pretrained base model, good at the templates and poor at the details.
 4. evaluate    the base model on the held-out split: greedy pass@1 and sampled pass@k.
 5. sample      R student responses per training problem at a few temperatures; the
                reference solution is the teacher.
 6. rank        the sandbox executes and scores them; prepare tokenises the ranked set.
 7. RRTF        the RRTF loss (ranking + cross-entropy on the best response) from the base.
 8. evaluate    the RRTF model, as in 4.
 9. ablation    (--ablation) the same training with the ranking loss off (rank_weight 0:
                cross-entropy on the best response only), evaluated as in 4.
Ranking accuracy: on a held-out ranked set built from the base model's sampled held-out
responses plus the references (ranked in the sandbox), the fraction of pairs (better,
worse) where a model gives the better response the higher length-normalised
log-probability. Outputs: summary.json (`base`, `rrtf`, `ablation`), report.md,
curves.png (loss terms and ranking accuracy over steps) and pass_at_k.png.

Each stage writes `stages/<name>.json` when done and is skipped on a rerun; the stages
themselves resume (checkpoints, finished files and parts), so a killed demo continues where
it stopped. A workdir made with other settings (seed, --quick) is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import time
from typing import TYPE_CHECKING

from data.problems import InputError, read_jsonl, write_jsonl_atomic, write_text_atomic

if TYPE_CHECKING:  # annotations only: each stage imports what it runs (JAX, TF) when it runs
  from model.decode import Decoder
  from rrtf_jax.stages.sample import Teacher

SETTINGS_FILE = "demo.json"
MODELS = ("base", "rrtf", "ablation")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the demo does at a given size; every number is recorded in summary.json."""

  warmup: int  # problems per split
  train: int
  heldout: int
  warmup_steps: int
  warmup_lr: float
  rrtf_steps: int
  rrtf_lr: float
  batch: int  # prompts per step
  responses: int  # R per prompt in RRTF training
  samples: int  # student samples per training problem
  temperatures: tuple[float, ...]
  eval_n: int  # samples per held-out problem for pass@k
  eval_temperature: float
  ks: tuple[int, ...]
  # prompt (<= ~80 tokens) + signature and docstring + max_new_tokens; longer is cut
  seq_len: int = 192
  buckets: str = "128,192"
  max_new_tokens: int = 64
  chunk: int = 16  # decode steps per host round trip
  max_batch: int = 64  # rows decoded together


DEFAULT = Sizes(
  warmup=256,
  train=128,
  heldout=128,
  warmup_steps=300,
  warmup_lr=3e-3,
  rrtf_steps=250,
  rrtf_lr=3e-3,
  batch=16,
  responses=4,
  samples=6,
  temperatures=(0.4, 0.8, 1.2),
  eval_n=10,
  eval_temperature=0.8,
  ks=(1, 5, 10),
)
QUICK = Sizes(
  warmup=32,
  train=16,
  heldout=16,
  warmup_steps=30,
  warmup_lr=3e-3,
  rrtf_steps=10,
  rrtf_lr=3e-3,
  batch=8,
  responses=3,
  samples=2,
  temperatures=(0.8,),
  eval_n=4,
  eval_temperature=0.8,
  ks=(1, 4),
  seq_len=192,
  buckets="192",
  max_new_tokens=48,
)


def _say(msg: str) -> None:
  print(f"[demo] {msg}", flush=True)


class _Stages:
  """Runs named stages once: a stage's result lands in stages/<name>.json when it is done."""

  def __init__(self, workdir: str, total: int):
    self.dir, self.total, self.index = os.path.join(workdir, "stages"), total, 0

  def run(self, name: str, title: str, fn) -> dict:
    self.index += 1
    path = os.path.join(self.dir, f"{name}.json")
    head = f"stage {self.index}/{self.total} {title}"
    if os.path.exists(path):
      with open(path) as f:
        out = json.load(f)
      _say(f"{head}: done in an earlier run ({out.get('note', '')})")
      return out
    _say(f"{head} ...")
    t0 = time.perf_counter()
    out = fn()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(path, json.dumps(out, indent=2) + "\n")
    _say(f"{head}: {out.get('note', 'done')} ({out['seconds']:.0f} s)")
    return out


def _check_settings(workdir: str, settings: dict) -> None:
  path = os.path.join(workdir, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
      raise InputError(
        f"{path}: this workdir was made with other settings ({', '.join(diff)} differ); "
        "use another --workdir or remove it"
      )
  else:
    os.makedirs(workdir, exist_ok=True)
    write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def _train_config(
  sizes: Sizes,
  seed: int,
  data_dir: str,
  *,
  steps: int,
  lr: float,
  responses: int,
  init_from: str = "",
  rank_weight: float = 1.0,
):
  from rrtf_jax.config_loading import load_config

  c = load_config("tiny")
  c.seed = seed
  c.init_from = init_from
  c.data.dir = data_dir
  c.data.buckets = sizes.buckets
  t = c.train
  t.batch_size, t.responses, t.seq_len, t.steps = sizes.batch, responses, sizes.seq_len, steps
  t.learning_rate, t.warmup_steps, t.schedule = lr, max(1, steps // 20), "cosine"
  t.rank_weight = rank_weight
  t.log_every = max(1, min(10, steps // 10))
  t.checkpoint_every = max(50, steps // 4)  # a save is slow next to a tiny step
  return c


def _train(config, workdir: str, model_dir: str, tokenizer_dir: str, progress: bool) -> dict:
  """`rrtf train` to config.train.steps (resuming), then the final params as a model checkpoint."""
  from model import ModelConfig, save_checkpoint
  from model.checkpoint import is_checkpoint
  from rrtf_jax.stages.train import train_and_evaluate

  result = train_and_evaluate(config, workdir, progress=progress)
  if result.step < int(config.train.steps):  # SIGTERM: the checkpoint of this step is written
    from rrtf_jax.stages.sample import Preempted

    raise Preempted()
  if not is_checkpoint(model_dir):
    save_checkpoint(
      model_dir, ModelConfig.from_dict(config.model), result.params, tokenizer_dir=tokenizer_dir
    )
  return {"steps": result.step, "resumed_from": result.resumed_from}


def _curves(train_dir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] from the run's TensorBoard events (the newest value wins per step,
  so a resumed run's rewritten steps replace the killed run's)."""
  import tensorflow as tf

  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(train_dir, "tensorboard", "events.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag.startswith("train/"):
          out.setdefault(v.tag[len("train/") :], {})[int(event.step)] = float(v.simple_value)
  return {k: sorted(v.items()) for k, v in out.items()}


def _compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache unless it is configured already
  (JAX_COMPILATION_CACHE_DIR): a resumed demo, another seed or the next run skips the
  compiles (much of a small demo's time on CPU). Default ~/.cache/rrtf-jax/jax, as MaxText
  keeps one in ~/jax_cache."""
  import jax

  if not jax.config.jax_compilation_cache_dir:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "rrtf-jax", "jax"))
  return jax.config.jax_compilation_cache_dir


@dataclasses.dataclass
class _Demo:
  """One demo run: its (absolute) workdir, sizes and seed, the stage runner, and the decoders
  the stages share (one per model, built on first use)."""

  workdir: str
  sizes: Sizes
  seed: int
  progress: bool
  stages: _Stages
  decoders: dict[str, Decoder] = dataclasses.field(default_factory=dict)

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def problems(self, split: str) -> str:
    """The split's HumanEval-format problems (JSONL)."""
    return self.path("problems", f"{split}.jsonl")

  @property
  def tokenizer_dir(self) -> str:
    return self.path("tokenizer")

  def stage(self, name: str, title: str, fn, *args) -> dict:
    """fn(self, *args) as stage `name`, unless an earlier run finished it (then its result)."""
    return self.stages.run(name, title, functools.partial(fn, self, *args))

  def decoder(self, name: str) -> Decoder:
    """models/<name> as a Decoder, built once and then shared by the stages that decode."""
    if name not in self.decoders:
      from model import decode

      self.decoders[name] = decode.Decoder.from_checkpoint(
        self.path("models", name),
        chunk=self.sizes.chunk,
        max_batch=self.sizes.max_batch,
        seed=self.seed,
      )
    return self.decoders[name]


def run_demo(
  workdir: str, seed: int = 0, quick: bool = False, ablation: bool = False, progress: bool = True
) -> dict:
  """The demo's stages in order (the module docstring says what each does); returns the summary
  (summary.json)."""
  start = time.perf_counter()
  demo = _open(workdir, seed, quick, ablation, progress)
  demo.stage("problems", "synthetic problems", _make_problems)
  demo.stage("tokenizer", "tokenizer", _make_tokenizer)
  demo.stage("warmup", "warm-up fine-tuning", _warm_up)
  results = {"base": _evaluate(demo, "base")}
  demo.stage("sample", f"sample {demo.sizes.samples} responses per training problem", _sample_train)
  demo.stage("rank", "rank in the sandbox and prepare", _rank_and_prepare, "rrtf")
  demo.stage(
    "heldout_ranked",
    "rank the base model's held-out samples (for ranking accuracy)",
    _heldout_ranked,
  )
  demo.stage(
    "train_rrtf",
    "RRTF training (ranking loss + cross-entropy on the best response)",
    _train_model,
    "rrtf",
    1.0,
  )
  results["rrtf"] = _evaluate(demo, "rrtf")
  if ablation:
    demo.stage(
      "train_ablation",
      "ablation: the same training with the ranking loss off",
      _train_model,
      "ablation",
      0.0,
    )
    results["ablation"] = _evaluate(demo, "ablation")
  accuracy = demo.stage(
    "ranking_accuracy" + ("_ablation" if ablation else ""),
    "ranking accuracy on held-out responses",
    _ranking_accuracy,
    tuple(results),
  )
  return _finish(demo, quick, results, accuracy["models"], start)


def _open(workdir: str, seed: int, quick: bool, ablation: bool, progress: bool) -> _Demo:
  """Checks the workdir's settings (recording them in a new one) and turns on the compilation
  cache; 10 stages, 12 with the ablation."""
  sizes = QUICK if quick else DEFAULT
  workdir = os.path.abspath(workdir)
  sizes_json = json.loads(json.dumps(dataclasses.asdict(sizes)))  # tuples as lists, as read back
  _check_settings(workdir, {"seed": seed, "quick": quick, "sizes": sizes_json})
  _compilation_cache()
  return _Demo(workdir, sizes, seed, progress, _Stages(workdir, 10 + (2 if ablation else 0)))


def _make_problems(demo: _Demo) -> dict:
  """problems/<split>.jsonl and problems/<split>-references.jsonl (the reference solutions
  as teacher answers) for each split."""
  from data import synthetic

  parts = synthetic.splits(demo.seed, demo.sizes.warmup, demo.sizes.train, demo.sizes.heldout)
  for name, rows in parts.items():
    write_jsonl_atomic(demo.problems(name), rows)
    write_jsonl_atomic(
      demo.path("problems", f"{name}-references.jsonl"),
      [
        {"task_id": p["task_id"], "completion": p["canonical_solution"], "model": "reference"}
        for p in rows
      ],
    )
  return {
    "note": ", ".join(f"{k} {len(v)}" for k, v in parts.items()) + " problems",
    "families": len(synthetic.FAMILIES),
    **{k: len(v) for k, v in parts.items()},
  }


def _make_tokenizer(demo: _Demo) -> dict:
  from data.tokenizer import builtin_corpus, train_sentencepiece
  from rrtf_jax.config_loading import load_config

  texts = [
    row["prompt"] + row["canonical_solution"]
    for split in ("warmup", "train")
    for _, row in read_jsonl(demo.problems(split), ("prompt", "canonical_solution"))
  ]
  vocab = int(load_config("tiny").tokenizer.vocab_size)
  tokenizer = train_sentencepiece(builtin_corpus() + texts, demo.tokenizer_dir, vocab_size=vocab)
  return {"note": f"{tokenizer.vocab_size}-piece SentencePiece", "vocab_size": tokenizer.vocab_size}


def _references(demo: _Demo, split: str) -> Teacher:
  """The split's reference solutions as a teacher."""
  from rrtf_jax.stages import sample

  answers = sample.load_teacher_file(
    demo.path("problems", f"{split}-references.jsonl"), sample.load_problems(demo.problems(split))
  )
  return sample.Teacher(answers=answers)


def _rank_and_prepare(demo: _Demo, name: str, keep_student_wins: bool = False) -> dict:
  """data/<name>/samples ranked in the sandbox (data/<name>/ranked) and tokenised
  (data/<name>/prepared)."""
  from rrtf_jax.stages.prepare import prepare_stage
  from rrtf_jax.stages.rank import rank_stage

  ranked = demo.path("data", name, "ranked")
  result = rank_stage(
    demo.path("data", name, "samples"),
    ranked,
    keep_student_wins=keep_student_wins,
    progress=demo.progress,
  )
  prepare_stage(
    ranked, demo.path("data", name, "prepared"), demo.tokenizer_dir, progress=demo.progress
  )
  outcomes = ", ".join(f"{k} {v}" for k, v in sorted(result.outcomes.items()))
  return {
    "problems": result.problems,
    "kept": result.kept,
    "responses": result.responses,
    "outcomes": dict(result.outcomes),
    "note": f"{result.responses} responses to {result.problems} problems ({outcomes}); "
    f"{result.kept} problems kept",
  }


def _warm_up(demo: _Demo) -> dict:
  """The base model (models/base): plain fine-tuning (R = 1) on the warm-up references."""
  from rrtf_jax.stages.sample import sample_stage

  sizes = demo.sizes
  sample_stage(
    demo.problems("warmup"),
    demo.path("data", "warmup", "samples"),
    num_samples=0,
    teacher=_references(demo, "warmup"),
    seed=demo.seed,
    progress=demo.progress,
  )
  ranked = _rank_and_prepare(demo, "warmup")
  config = _train_config(
    sizes,
    demo.seed,
    demo.path("data", "warmup", "prepared"),
    steps=sizes.warmup_steps,
    lr=sizes.warmup_lr,
    responses=1,
  )
  out = _train(
    config,
    demo.path("train", "warmup"),
    demo.path("models", "base"),
    demo.tokenizer_dir,
    demo.progress,
  )
  return {
    "note": f"{out['steps']} steps of fine-tuning on {sizes.warmup} reference solutions",
    **out,
    "ranked": ranked,
  }


def _evaluate(demo: _Demo, name: str) -> dict:
  """Stage eval_<name>."""
  return demo.stage(
    f"eval_{name}", f"evaluate {name} on {demo.sizes.heldout} held-out problems", _evaluation, name
  )


def _evaluation(demo: _Demo, name: str) -> dict:
  """models/<name> on the held-out split: greedy pass@1 and sampled pass@k."""
  from rrtf_jax.stages.evaluate import evaluate

  sizes, model, problems = demo.sizes, demo.path("models", name), demo.problems("heldout")
  common = {
    "max_new_tokens": sizes.max_new_tokens,
    "seed": demo.seed,
    "progress": demo.progress,
    "decoder": functools.partial(demo.decoder, name),
  }  # built only if a part decodes
  greedy = evaluate(
    model, problems, demo.path("eval", f"{name}-greedy"), greedy=True, **common
  ).summary
  sampled = evaluate(
    model,
    problems,
    demo.path("eval", f"{name}-sampled"),
    n=sizes.eval_n,
    temperature=sizes.eval_temperature,
    top_p=0.95,
    ks=sizes.ks,
    **common,
  ).summary
  out = {
    "pass@1": greedy["pass@k"]["pass@1"],
    "pass@k": sampled["pass@k"],
    "outcomes_greedy": greedy["outcomes"],
    "outcomes_sampled": sampled["outcomes"],
  }
  figures = ", ".join(f"{k} {v:.3f}" for k, v in out["pass@k"].items())
  out["note"] = f"greedy pass@1 {out['pass@1']:.3f}; sampled (n={sizes.eval_n}) {figures}"
  return out


def _sample_train(demo: _Demo) -> dict:
  """The base model's responses to the training problems, the references as the teacher."""
  from rrtf_jax.stages.sample import sample_stage

  sizes = demo.sizes
  result = sample_stage(
    demo.problems("train"),
    demo.path("data", "rrtf", "samples"),
    decoder=demo.decoder("base"),
    num_samples=sizes.samples,
    temperatures=sizes.temperatures,
    top_p=0.95,
    max_new_tokens=sizes.max_new_tokens,
    teacher=_references(demo, "train"),
    seed=demo.seed,
    progress=demo.progress,
  )
  return {
    "note": f"{result.student_responses} student and {result.teacher_responses} reference "
    "responses",
    "student_responses": result.student_responses,
    "teacher_responses": result.teacher_responses,
  }


def _heldout_ranked(demo: _Demo) -> dict:
  """The base model's sampled held-out responses plus the references, ranked: the set on
  which every model's ranking accuracy is measured."""
  from data import records
  from rrtf_jax.stages.sample import SAMPLES_NAME

  rows = _heldout_records(demo)
  samples = demo.path("data", "heldout", "samples")
  os.makedirs(samples, exist_ok=True)
  records.write_atomic(
    os.path.join(samples, records.shard_name(SAMPLES_NAME, "train", 0, 1)), rows, ranked=False
  )
  return _rank_and_prepare(demo, "heldout", keep_student_wins=True)


def _heldout_records(demo: _Demo) -> list[dict]:
  """One unranked samples record per held-out problem: the base model's responses, then the
  reference."""
  from rrtf_jax.stages.sample import load_problems

  by_task = _base_samples(demo)
  references = _references(demo, "heldout").answers
  rows = []
  for p in load_problems(demo.problems("heldout")):
    students = by_task[p.task_id]
    reference = [code for _, code, _ in references[p.task_id]]
    rows.append(
      {
        "task_id": p.task_id,
        "prompt": p.prompt,
        "test": p.test,
        "entry_point": p.entry_point,
        "exec_prefix": p.exec_prefix,
        "sources": ["base"] * len(students) + ["reference"],
        "responses": students + reference,
        "codes": students + reference,
        "is_teacher": [0] * len(students) + [1],
      }
    )
  return rows


def _base_samples(demo: _Demo) -> dict[str, list[str]]:
  """task_id -> the base model's sampled held-out completions (eval_base's samples.jsonl)."""
  by_task: dict[str, list[str]] = {}
  with open(demo.path("eval", "base-sampled", "samples.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      by_task.setdefault(row["task_id"], []).append(row["completion"])
  return by_task


def _train_model(demo: _Demo, name: str, rank_weight: float) -> dict:
  """models/<name>: the RRTF loss with this ranking weight, from the base model."""
  sizes = demo.sizes
  config = _train_config(
    sizes,
    demo.seed,
    demo.path("data", "rrtf", "prepared"),
    steps=sizes.rrtf_steps,
    lr=sizes.rrtf_lr,
    responses=sizes.responses,
    init_from=demo.path("models", "base"),
    rank_weight=rank_weight,
  )
  out = _train(
    config, demo.path("train", name), demo.path("models", name), demo.tokenizer_dir, demo.progress
  )
  return {"note": f"{out['steps']} steps", **out}


def _ranking_accuracy(demo: _Demo, names: tuple[str, ...]) -> dict:
  """Each trained model's ranking accuracy on the held-out ranked set."""
  from model import load_checkpoint
  from rrtf_jax.train_step import ranking_metrics

  config = _train_config(demo.sizes, demo.seed, "", steps=1, lr=1.0, responses=1)
  loaded = {name: load_checkpoint(demo.path("models", name)) for name in MODELS if name in names}
  params = {name: p for name, (_, p) in loaded.items()}
  out = ranking_metrics(
    loaded["base"][0],
    config.train,
    params,
    demo.path("data", "heldout", "prepared"),
    responses=demo.sizes.eval_n + 1,
  )
  return {
    "note": ", ".join(f"{k} {v['ranking_accuracy']:.3f}" for k, v in out.items()),
    "models": out,
  }


def _finish(demo: _Demo, quick: bool, results: dict, accuracy: dict, start: float) -> dict:
  """summary.json, report.md and the plots; prints the table."""
  summary = _summarize(demo.workdir, demo.sizes, demo.seed, quick, results, accuracy)
  summary["seconds"] = round(time.perf_counter() - start, 1)
  write_text_atomic(demo.path("summary.json"), json.dumps(summary, indent=2) + "\n")
  write_text_atomic(demo.path("report.md"), report_markdown(summary))
  _plots(demo.workdir, summary)
  print(table(summary), flush=True)
  _say(
    f"done in {summary['seconds']:.0f} s; report in {demo.path('report.md')}, summary in "
    f"{demo.path('summary.json')}, plots {demo.path('curves.png')} and "
    f"{demo.path('pass_at_k.png')}"
  )
  return summary


def _summarize(
  workdir: str, sizes: Sizes, seed: int, quick: bool, results: dict, accuracy: dict
) -> dict:
  evaluation = {
    "problems": sizes.heldout,
    "split": "heldout",
    "pass@1": "greedy",
    "n": sizes.eval_n,
    "temperature": sizes.eval_temperature,
    "top_p": 0.95,
    "max_new_tokens": sizes.max_new_tokens,
  }
  base = {
    "model": "tiny config, random init",
    "warmup_problems": sizes.warmup,
    "steps": sizes.warmup_steps,
    "learning_rate": sizes.warmup_lr,
    "batch_size": sizes.batch,
    "responses": 1,
  }
  trained = {
    "init_from": "base",
    "train_problems": sizes.train,
    "steps": sizes.rrtf_steps,
    "learning_rate": sizes.rrtf_lr,
    "batch_size": sizes.batch,
    "responses": sizes.responses,
    "student_samples": sizes.samples,
    "temperatures": list(sizes.temperatures),
    "teacher": "reference solutions",
  }
  settings = {
    "base": base,
    "rrtf": dict(trained, rank_weight=1.0),
    "ablation": dict(trained, rank_weight=0.0),
  }
  out = {}
  for name in MODELS:
    if name not in results:
      out[name] = None
      continue
    r = results[name]
    out[name] = {
      "pass@1": r["pass@1"],
      "pass@k": r["pass@k"],
      "ranking_accuracy": accuracy[name]["ranking_accuracy"],
      "ranking_pairs": accuracy[name]["pairs"],
      "outcomes": r["outcomes_sampled"],
      "settings": dict(settings[name], evaluation=evaluation),
    }
  out.update(
    seed=seed,
    quick=quick,
    workdir=workdir,
    curves={
      name: _curves(os.path.join(workdir, "train", name))
      for name in ("warmup", "rrtf", "ablation")
      if os.path.isdir(os.path.join(workdir, "train", name))
    },
  )
  return out


def _columns(summary: dict) -> list[str]:
  return (
    ["pass@1 (greedy)"]
    + [
      f"{k} (n={summary['base']['settings']['evaluation']['n']})" for k in summary["base"]["pass@k"]
    ]
    + ["ranking accuracy"]
  )


def _rows(summary: dict) -> list[tuple[str, list[float]]]:
  return [
    (name, [r["pass@1"], *r["pass@k"].values(), r["ranking_accuracy"]])
    for name in MODELS
    if (r := summary.get(name)) is not None
  ]


def table(summary: dict) -> str:
  """The printed table: one row per model."""
  cols = _columns(summary)
  lines = [f"{'model':10s}" + "".join(f"{c:>18s}" for c in cols)]
  lines += [f"{name:10s}" + "".join(f"{v:18.3f}" for v in vals) for name, vals in _rows(summary)]
  return "\n".join(lines)


def report_markdown(summary: dict) -> str:
  b, r = summary["base"], summary["rrtf"]
  ev = b["settings"]["evaluation"]
  lines = [
    f"# rrtf demo (seed {summary['seed']}{', quick' if summary['quick'] else ''})",
    "",
    f"Held-out: {ev['problems']} synthetic problems no training split contains. pass@1 "
    f"(greedy) decodes greedily; pass@k uses n={ev['n']} samples at temperature "
    f"{ev['temperature']}, top-p {ev['top_p']} (unbiased estimator). Ranking accuracy: over pairs "
    "of the base model's held-out samples and the references with different scores, how often a "
    "model gives the better one the higher mean log-probability.",
    "",
    "| model | " + " | ".join(_columns(summary)) + " |",
    "|---" * (len(_columns(summary)) + 1) + "|",
  ]
  lines += [
    f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for name, vals in _rows(summary)
  ]
  delta = r["pass@1"] - b["pass@1"]
  lines += ["", f"RRTF changed greedy pass@1 by {delta:+.3f} over the base model."]
  if summary.get("ablation"):
    lines.append(
      f"The ablation (ranking loss off, same steps) changed it by "
      f"{summary['ablation']['pass@1'] - b['pass@1']:+.3f}."
    )
  lines += ["", "## Settings", ""]
  for name in MODELS:
    if summary.get(name):
      s = {k: v for k, v in summary[name]["settings"].items() if k != "evaluation"}
      lines.append(f"- **{name}**: " + ", ".join(f"{k} {v}" for k, v in s.items()))
  lines += [
    "",
    "Plots: `curves.png` (loss terms and ranking accuracy per training step), `pass_at_k.png`.",
    "This is a toy: a 2-layer model on a synthetic family shows the mechanics and the direction of "
    "the effect, not StarCoder-scale numbers.",
    "",
  ]
  return "\n".join(lines)


def _plots(workdir: str, summary: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = summary["curves"]
  tags = [
    ("loss", "total loss"),
    ("rank_loss", "ranking loss"),
    ("ft_loss", "fine-tuning loss (sum per prompt)"),
    ("ranking_accuracy", "ranking accuracy (training batch)"),
  ]
  fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.4))
  for ax, (tag, title) in zip(axes, tags):
    for name in ("rrtf", "ablation"):
      pts = curves.get(name, {}).get(tag)
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "curves.png.tmp"), format="png", dpi=90)
  plt.close(fig)
  os.replace(os.path.join(workdir, "curves.png.tmp"), os.path.join(workdir, "curves.png"))

  cols, rows = _columns(summary)[:-1], _rows(summary)
  fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(cols), 3.4))
  width = 0.8 / len(rows)
  for i, (name, vals) in enumerate(rows):
    ax.bar([c + i * width for c in range(len(cols))], vals[:-1], width, label=name)
  ax.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(cols))], cols, fontsize=8)
  ax.set_ylabel("held-out pass rate")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "pass_at_k.png.tmp"), format="png", dpi=90)
  plt.close(fig)
  os.replace(os.path.join(workdir, "pass_at_k.png.tmp"), os.path.join(workdir, "pass_at_k.png"))
