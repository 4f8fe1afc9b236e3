"""`rrtf demo`: the whole RRTF loop on CPU in minutes, with a measured before and after.

Every stage runs the code a pod runs (`rrtf sample`, `rank`, `prepare`, `train`,
`evaluate`); only the sizes are small:

 1. problems    data.synthetic: seeded HumanEval-format problems, split into warm-up,
                RRTF-training and held-out problems that share no instance, plus a
                new-template held-out split (`heldout_new`) of templates that neither
                training split uses: in-template vs new-template pass@1 tells recall of a
                trained template from transfer.
 2. tokenizer   the tiny config's SentencePiece, trained on the warm-up and training text.
 3. warm-up     plain fine-tuning (R = 1) of the randomly initialised tiny model on the
                warm-up problems' reference solutions, run through sample (the references
                as a teacher file, no student samples), rank and prepare; a stand-in for a
                pretrained base model, good at the templates and poor at the details.
 4. evaluate    the base model on both held-out splits: greedy pass@1 and sampled pass@k,
                each with a bootstrap 95% interval over problems.
 5. sample      R student responses per training problem at a few temperatures; the
                reference solution is the teacher.
 6. rank        the sandbox executes and scores them; prepare tokenises the ranked set.
 7. RRTF        the RRTF loss (ranking + cross-entropy on the best response) from the base.
 8. evaluate    the RRTF model, as in 4.
 9. rounds      (--rounds N) on-policy rounds 2..N: sample from the last round's model, rank,
                prepare, train from it (`rrtf_r2`, ...), evaluate; the training problems and
                teacher stay the same.
10. ablation    (--ablation) the same training with the ranking loss off (rank_weight 0:
                cross-entropy on the best response only), evaluated as in 4.
11. accuracy    ranking accuracy: on a held-out ranked set built from the base model's
                sampled held-out responses plus the references (ranked in the sandbox), the
                fraction of pairs (better, worse) where a model gives the better response the
                higher length-normalised log-probability.
Outputs: summary.json (one entry per model, with intervals, and paired tests of each model
against the base and of RRTF against the ablation), report.md, curves.png (loss terms and
ranking accuracy over steps) and pass_at_k.png (with 95% intervals).

Each stage writes `stages/<name>.json` when done and is skipped on a rerun; the stages
themselves resume (checkpoints, finished files and parts), so a killed demo continues where
it stopped, and a rerun with more --rounds adds the new rounds. A workdir made with other
settings (seed, --quick) is refused. `benchmarks/ablation.py` trains more arms (loss
variants) on the same stages through `train_arm`.
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
# train.* settings an arm may change (rrtf_jax/loss.py says what each does)
LOSS_SETTINGS = ("rank_weight", "ft_normalization", "pair_loss", "weighting", "beta", "gamma")
ABLATION = {"rank_weight": 0.0}  # --ablation: the ranking loss off


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the demo does at a given size; every number is recorded in summary.json."""

  warmup: int  # problems per split
  train: int
  heldout: int
  heldout_new: int  # problems of templates no training split has
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
  heldout_new=64,
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
  heldout_new=8,
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

  def __init__(self, workdir: str, total: int | None):
    self.dir, self.total, self.index = os.path.join(workdir, "stages"), total, 0

  def result(self, name: str) -> dict:
    """A finished stage's result."""
    with open(os.path.join(self.dir, f"{name}.json")) as f:
      return json.load(f)

  def run(self, name: str, title: str, fn) -> dict:
    self.index += 1
    path = os.path.join(self.dir, f"{name}.json")
    head = f"stage {self.index}{'' if self.total is None else f'/{self.total}'} {title}"
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
  loss: dict | None = None,
):
  """The tiny config at these sizes; `loss` sets train.* loss settings (LOSS_SETTINGS)."""
  from rrtf_jax.config_loading import load_config

  c = load_config("tiny")
  c.seed = seed
  c.init_from = init_from
  c.data.dir = data_dir
  c.data.buckets = sizes.buckets
  t = c.train
  t.batch_size, t.responses, t.seq_len, t.steps = sizes.batch, responses, sizes.seq_len, steps
  t.learning_rate, t.warmup_steps, t.schedule = lr, max(1, steps // 20), "cosine"
  for key, value in (loss or {}).items():
    if key not in LOSS_SETTINGS:
      raise ValueError(f"{key!r} is not a loss setting; one of {LOSS_SETTINGS}")
    setattr(t, key, value)
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
  workdir: str,
  seed: int = 0,
  quick: bool = False,
  ablation: bool = False,
  rounds: int = 1,
  progress: bool = True,
) -> dict:
  """The demo's stages in order (the module docstring says what each does); returns the summary
  (summary.json)."""
  if rounds < 1:
    raise InputError(f"--rounds must be at least 1, got {rounds}")
  start = time.perf_counter()
  total = 11 + 5 * (rounds - 1) + (3 if ablation else 0)
  demo = open_demo(workdir, seed, QUICK if quick else DEFAULT, progress, total=total)
  prepare_base(demo)
  models = ["base", *train_arm(demo, "rrtf", rounds=rounds)]
  if ablation:
    models += train_arm(demo, "ablation", loss=ABLATION)
  return finish(demo, models, start)


def open_demo(workdir: str, seed: int, sizes: Sizes, progress: bool, total: int | None) -> _Demo:
  """Checks the workdir's settings (recording them in a new one) and turns on the compilation
  cache; `total` stages are announced (None: not known in advance)."""
  workdir = os.path.abspath(workdir)
  sizes_json = json.loads(json.dumps(dataclasses.asdict(sizes)))  # tuples as lists, as read back
  _check_settings(workdir, {"seed": seed, "quick": sizes == QUICK, "sizes": sizes_json})
  _compilation_cache()
  return _Demo(workdir, sizes, seed, progress, _Stages(workdir, total))


def prepare_base(demo: _Demo) -> None:
  """Everything before the first RRTF training: problems, tokenizer, the base model and its
  evaluation, its samples of the training problems ranked and prepared (data/rrtf), and the
  held-out ranked set of the ranking accuracy."""
  demo.stage("problems", "synthetic problems", _make_problems)
  demo.stage("tokenizer", "tokenizer", _make_tokenizer)
  demo.stage("warmup", "warm-up fine-tuning", _warm_up)
  _evaluate(demo, "base")
  demo.stage(
    "sample",
    f"sample {demo.sizes.samples} responses per training problem",
    _sample_train,
    "rrtf",
    "base",
    1,
  )
  demo.stage("rank", "rank in the sandbox and prepare", _rank_and_prepare, "rrtf")
  demo.stage(
    "heldout_ranked",
    "rank the base model's held-out samples (for ranking accuracy)",
    _heldout_ranked,
  )


def train_arm(
  demo: _Demo, arm: str, *, loss: dict | None = None, rounds: int = 1, steps: int | None = None
) -> list[str]:
  """Trains models/<arm> from the base model on data/rrtf (the base model's ranked samples)
  with these loss settings (train.*, LOSS_SETTINGS) for `steps` (default sizes.rrtf_steps)
  and evaluates it; then each on-policy round r = 2..rounds samples the training problems from
  the last model, ranks and prepares them (data/<arm>_r<r>), trains <arm>_r<r> from the last
  model for the same steps and evaluates it. Returns the models' names."""
  steps = steps or demo.sizes.rrtf_steps
  names, last = [], "base"
  for r in range(1, rounds + 1):
    name = arm if r == 1 else f"{arm}_r{r}"
    data = "rrtf" if r == 1 else name
    if r > 1:
      head = f"{arm} round {r}/{rounds}"
      demo.stage(f"sample_{name}", f"{head}: sample from {last}", _sample_train, data, last, r)
      demo.stage(f"rank_{name}", f"{head}: rank and prepare", _rank_and_prepare, data)
    title = f"train {name}: " + (
      "RRTF (ranking loss + cross-entropy on the best response)"
      if not loss
      else ", ".join(f"{k} {v}" for k, v in loss.items())
    )
    demo.stage(f"train_{name}", title, _train_model, name, data, last, steps, loss or {}, r)
    _evaluate(demo, name)
    names.append(name)
    last = name
  return names


def _make_problems(demo: _Demo) -> dict:
  """problems/<split>.jsonl and problems/<split>-references.jsonl (the reference solutions
  as teacher answers) for each split, heldout_new included."""
  from data import synthetic

  sizes = demo.sizes
  parts = synthetic.splits(demo.seed, sizes.warmup, sizes.train, sizes.heldout)
  parts["heldout_new"] = synthetic.new_template_problems(demo.seed, sizes.heldout_new)
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
    "new_families": len(synthetic.NEW_FAMILIES),
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
    "settings": {
      "model": "tiny config, random init",
      "warmup_problems": sizes.warmup,
      "steps": sizes.warmup_steps,
      "learning_rate": sizes.warmup_lr,
      "batch_size": sizes.batch,
      "responses": 1,
    },
  }


def _evaluate(demo: _Demo, name: str) -> dict:
  """Stage eval_<name>."""
  sizes = demo.sizes
  return demo.stage(
    f"eval_{name}",
    f"evaluate {name} on {sizes.heldout} held-out and {sizes.heldout_new} new-template problems",
    _evaluation,
    name,
  )


SPLITS = {"heldout": "", "heldout_new": "new-"}  # held-out split -> its eval dirs' infix


def eval_dir(workdir: str, name: str, split: str, mode: str) -> str:
  """The `rrtf evaluate` output of model `name` in a demo workdir on a held-out split, mode
  greedy|sampled."""
  return os.path.join(workdir, "eval", f"{name}-{SPLITS[split]}{mode}")


def _evaluation(demo: _Demo, name: str) -> dict:
  """models/<name> on each held-out split: greedy pass@1 and sampled pass@k, each with its
  bootstrap SE and 95% interval over problems (as summary.json of `rrtf evaluate`)."""
  from rrtf_jax.stages.evaluate import evaluate

  sizes, model = demo.sizes, demo.path("models", name)
  common = {
    "max_new_tokens": sizes.max_new_tokens,
    "seed": demo.seed,
    "progress": demo.progress,
    "decoder": functools.partial(demo.decoder, name),
  }  # built only if a part decodes
  out = {}
  for split in SPLITS:
    problems = demo.problems(split)
    greedy = evaluate(
      model, problems, eval_dir(demo.workdir, name, split, "greedy"), greedy=True, **common
    ).summary
    sampled = evaluate(
      model,
      problems,
      eval_dir(demo.workdir, name, split, "sampled"),
      n=sizes.eval_n,
      temperature=sizes.eval_temperature,
      top_p=0.95,
      ks=sizes.ks,
      **common,
    ).summary
    out[split] = {
      "pass@1": greedy["pass@k"]["pass@1"],
      "pass@1_se": greedy["pass@k_se"]["pass@1"],
      "pass@1_ci95": greedy["pass@k_ci95"]["pass@1"],
      **{key: sampled[key] for key in ("pass@k", "pass@k_se", "pass@k_ci95")},
      "outcomes_greedy": greedy["outcomes"],
      "outcomes_sampled": sampled["outcomes"],
    }
  heldout, new = out["heldout"], out["heldout_new"]
  figures = ", ".join(f"{k} {v:.3f}" for k, v in heldout["pass@k"].items())
  out["note"] = (
    f"greedy pass@1 {heldout['pass@1']:.3f}; sampled (n={sizes.eval_n}) {figures}; "
    f"new templates: greedy {new['pass@1']:.3f}, sampled pass@1 {new['pass@k']['pass@1']:.3f}"
  )
  return out


def per_problem(workdir: str, name: str, split: str, mode: str) -> dict[str, float]:
  """task_id -> the pass@1 estimate c/n of model `name` in a demo workdir (from its evaluate
  summary.json)."""
  with open(os.path.join(eval_dir(workdir, name, split, mode), "summary.json")) as f:
    rows = json.load(f)["per_problem"]
  return {r["task_id"]: r["c"] / r["n"] for r in rows}


def paired(demo: _Demo, a: str, b: str) -> dict:
  """Model a against model b on the same problems: the paired bootstrap interval of the
  pass@1 difference (a - b) and the exact sign test, greedy and sampled, on each held-out
  split (rrtf_jax.stats.paired_difference)."""
  from rrtf_jax.stats import paired_difference

  out = {}
  for split in SPLITS:
    for mode in ("greedy", "sampled"):
      va, vb = (per_problem(demo.workdir, m, split, mode) for m in (a, b))
      ids = sorted(va)
      out[f"{split}/{mode}"] = paired_difference(
        [va[t] for t in ids], [vb[t] for t in ids], seed=demo.seed
      )
  return out


def _sample_train(demo: _Demo, data: str, model: str, round_: int) -> dict:
  """models/<model>'s responses to the training problems (data/<data>/samples), the references
  as the teacher. Round r > 1 draws with another seed."""
  from rrtf_jax.stages.sample import sample_stage

  sizes = demo.sizes
  result = sample_stage(
    demo.problems("train"),
    demo.path("data", data, "samples"),
    decoder=demo.decoder(model),
    num_samples=sizes.samples,
    temperatures=sizes.temperatures,
    top_p=0.95,
    max_new_tokens=sizes.max_new_tokens,
    teacher=_references(demo, "train"),
    seed=demo.seed + 7919 * (round_ - 1),
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


def _train_model(
  demo: _Demo, name: str, data: str, init_from: str, steps: int, loss: dict, round_: int
) -> dict:
  """models/<name>: the RRTF loss with these settings on data/<data>, from models/<init_from>."""
  sizes = demo.sizes
  config = _train_config(
    sizes,
    demo.seed,
    demo.path("data", data, "prepared"),
    steps=steps,
    lr=sizes.rrtf_lr,
    responses=sizes.responses,
    init_from=demo.path("models", init_from),
    loss=loss,
  )
  out = _train(
    config, demo.path("train", name), demo.path("models", name), demo.tokenizer_dir, demo.progress
  )
  settings = {
    "init_from": init_from,
    "round": round_,
    "data": data,
    "train_problems": sizes.train,
    "steps": steps,
    "learning_rate": sizes.rrtf_lr,
    "batch_size": sizes.batch,
    "responses": sizes.responses,
    "student_samples": sizes.samples,
    "temperatures": list(sizes.temperatures),
    "teacher": "reference solutions",
    **{k: config.train[k] for k in LOSS_SETTINGS},
  }
  return {"note": f"{out['steps']} steps", **out, "settings": settings}


def _accuracy(demo: _Demo, name: str) -> dict:
  """Stage accuracy_<name>: the model's ranking accuracy on the held-out ranked set."""
  return demo.stage(
    f"accuracy_{name}", f"ranking accuracy of {name} on held-out responses", _ranking_accuracy, name
  )


def _ranking_accuracy(demo: _Demo, name: str) -> dict:
  from model import load_checkpoint
  from rrtf_jax.train_step import ranking_metrics

  config = _train_config(demo.sizes, demo.seed, "", steps=1, lr=1.0, responses=1)
  cfg, params = load_checkpoint(demo.path("models", name))
  out = ranking_metrics(
    cfg,
    config.train,
    {name: params},
    demo.path("data", "heldout", "prepared"),
    responses=demo.sizes.eval_n + 1,
  )[name]
  return {"note": f"{out['ranking_accuracy']:.3f} over {out['pairs']} pairs", **out}


def finish(demo: _Demo, models: list[str], start: float | None = None) -> dict:
  """Ranking accuracy of each model (a stage each), then summary.json, report.md and the plots;
  prints the table. Returns the summary."""
  accuracy = {name: _accuracy(demo, name) for name in models}
  summary = summarize(demo, models, accuracy)
  if start is not None:
    summary["seconds"] = round(time.perf_counter() - start, 1)
  write_text_atomic(demo.path("summary.json"), json.dumps(summary, indent=2) + "\n")
  write_text_atomic(demo.path("report.md"), report_markdown(summary))
  _plots(demo.workdir, summary)
  print(table(summary), flush=True)
  for line in paired_lines(summary):
    print(line, flush=True)
  took = f" in {summary['seconds']:.0f} s" if start is not None else ""
  _say(
    f"done{took}; report in {demo.path('report.md')}, summary in "
    f"{demo.path('summary.json')}, plots {demo.path('curves.png')} and "
    f"{demo.path('pass_at_k.png')}"
  )
  return summary


def comparisons(models: list[str], settings: dict[str, dict]) -> list[tuple[str, str]]:
  """The pairs the summary tests: each trained model against the base model and against the
  model it was trained from, and RRTF against the ablation."""
  pairs = []
  for name in models[1:]:
    pairs.append((name, "base"))
    init = settings[name].get("init_from", "base")
    if init != "base":
      pairs.append((name, init))
  if "rrtf" in models and "ablation" in models:
    pairs.append(("rrtf", "ablation"))
  return pairs


def summarize(demo: _Demo, models: list[str], accuracy: dict[str, dict]) -> dict:
  """summary.json: per model, held-out and new-template pass@k with intervals, ranking accuracy
  and settings; paired tests of the `comparisons`; training curves."""
  sizes = demo.sizes
  evaluation = {
    "problems": sizes.heldout,
    "new_template_problems": sizes.heldout_new,
    "pass@1": "greedy",
    "n": sizes.eval_n,
    "temperature": sizes.eval_temperature,
    "top_p": 0.95,
    "max_new_tokens": sizes.max_new_tokens,
    "interval": "95% bootstrap over problems (rrtf evaluate's summary.json)",
  }
  out: dict = {"models": list(models)}
  settings = {}
  for name in models:
    trained = demo.stages.result("warmup" if name == "base" else f"train_{name}")
    settings[name] = trained["settings"]
    ev = demo.stages.result(f"eval_{name}")
    held = ev["heldout"]
    out[name] = {
      **{k: v for k, v in held.items() if not k.startswith("outcomes")},
      "new_template": {k: v for k, v in ev["heldout_new"].items() if not k.startswith("outcomes")},
      "ranking_accuracy": accuracy[name]["ranking_accuracy"],
      "ranking_pairs": accuracy[name]["pairs"],
      "outcomes": held["outcomes_sampled"],
      "settings": dict(settings[name], evaluation=evaluation),
    }
  out["paired"] = {f"{a} vs {b}": paired(demo, a, b) for a, b in comparisons(models, settings)}
  out.update(
    seed=demo.seed,
    quick=sizes == QUICK,
    workdir=demo.workdir,
    curves={
      name: _curves(demo.path("train", name))
      for name in ("warmup", *models[1:])
      if os.path.isdir(demo.path("train", name))
    },
  )
  return out


def _columns(summary: dict) -> list[str]:
  n = summary[summary["models"][0]]["settings"]["evaluation"]["n"]
  ks = list(summary[summary["models"][0]]["pass@k"])
  return (
    ["pass@1 (greedy)"]
    + [f"{k} (n={n})" for k in ks]
    + ["new: pass@1 (greedy)", f"new: pass@1 (n={n})", "ranking accuracy"]
  )


def _rows(summary: dict) -> list[tuple[str, list[tuple[float, list[float] | None]]]]:
  """(model, [(value, 95% interval or None)] in _columns' order)."""
  rows = []
  for name in summary["models"]:
    r, new = summary[name], summary[name]["new_template"]
    cells = [(r["pass@1"], r["pass@1_ci95"])]
    cells += [(v, r["pass@k_ci95"][k]) for k, v in r["pass@k"].items()]
    cells += [(new["pass@1"], new["pass@1_ci95"])]
    cells += [(new["pass@k"]["pass@1"], new["pass@k_ci95"]["pass@1"])]
    cells += [(r["ranking_accuracy"], None)]
    rows.append((name, cells))
  return rows


def _cell(value: float, ci: list[float] | None) -> str:
  return f"{value:.3f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else "")


def table(summary: dict) -> str:
  """The printed table: one row per model, each figure with its 95% interval."""
  cols, rows = _columns(summary), _rows(summary)
  width = max(len(n) for n, _ in rows) + 2
  lines = [f"{'model':{width}s}" + "".join(f"{c:>22s}" for c in cols)]
  lines += [
    f"{name:{width}s}" + "".join(f"{_cell(*c):>22s}" for c in cells) for name, cells in rows
  ]
  return "\n".join(lines)


def significance(test: dict) -> str:
  """Plain words for a paired test at the 5% level."""
  lo, hi = test["ci95"]
  if test["p_value"] < 0.05 and (lo > 0 or hi < 0):
    return "significant at 5%"
  if test["p_value"] < 0.05 or lo > 0 or hi < 0:
    return "borderline (the sign test and the interval disagree)"
  return "not significant"


def paired_lines(summary: dict) -> list[str]:
  """One line per comparison and figure: the difference, its interval, the sign test."""
  names = {
    "heldout/greedy": "greedy pass@1",
    "heldout/sampled": "sampled pass@1",
    "heldout_new/greedy": "new-template greedy pass@1",
    "heldout_new/sampled": "new-template sampled pass@1",
  }
  lines = []
  for label, tests in summary["paired"].items():
    a, b = label.split(" vs ")
    for key, t in tests.items():
      lines.append(
        f"{a} - {b}, {names[key]}: {t['difference']:+.3f} [{t['ci95'][0]:+.3f}, "
        f"{t['ci95'][1]:+.3f}]; better on {t['a_better']} vs {t['b_better']} problems, "
        f"p = {t['p_value']:.2g}: {significance(t)}"
      )
  return lines


def report_markdown(summary: dict) -> str:
  first = summary["models"][0]
  ev = summary[first]["settings"]["evaluation"]
  cols = _columns(summary)
  lines = [
    f"# rrtf demo (seed {summary['seed']}{', quick' if summary['quick'] else ''})",
    "",
    f"Held-out: {ev['problems']} synthetic problems of the training templates that no training "
    f"split contains, and {ev['new_template_problems']} of templates no training split uses "
    f"(new). pass@1 (greedy) decodes greedily; pass@k uses n={ev['n']} samples at temperature "
    f"{ev['temperature']}, top-p {ev['top_p']} (unbiased estimator). In brackets: the 95% "
    "bootstrap interval over problems. Ranking accuracy: over pairs of the base model's "
    "held-out samples and the references with different scores, how often a model gives the "
    "better one the higher mean log-probability.",
    "",
    "| model | " + " | ".join(cols) + " |",
    "|---" * (len(cols) + 1) + "|",
  ]
  lines += [
    f"| {name} | " + " | ".join(_cell(*c) for c in cells) + " |" for name, cells in _rows(summary)
  ]
  lines += [
    "",
    "## Paired tests",
    "",
    "Difference of pass@1 on the same problems (first minus second), its 95% paired bootstrap "
    "interval, and the exact two-sided sign test over the problems where the two differ "
    "(McNemar's exact test for greedy). Significant: p < 0.05 and the interval excludes 0.",
    "",
  ]
  lines += [f"- {line}" for line in paired_lines(summary)]
  lines += ["", "## Settings", ""]
  for name in summary["models"]:
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

  curves, trained = summary["curves"], summary["models"][1:]
  tags = [
    ("loss", "total loss"),
    ("rank_loss", "ranking loss"),
    ("ft_loss", "fine-tuning loss"),
    ("ranking_accuracy", "ranking accuracy (training batch)"),
  ]
  fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.4))
  for ax, (tag, title) in zip(axes, tags):
    for name in trained:
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
  fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(cols), 3.6))
  width = 0.8 / len(rows)
  for i, (name, cells) in enumerate(rows):
    values = [v for v, _ in cells[:-1]]
    errors = [[v - ci[0] for v, ci in cells[:-1]], [ci[1] - v for v, ci in cells[:-1]]]
    xs = [c + i * width for c in range(len(cols))]
    ax.bar(xs, values, width, yerr=errors, capsize=2, label=name)
  ax.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(cols))], cols, fontsize=7)
  ax.set_ylabel("held-out pass rate (95% interval)")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "pass_at_k.png.tmp"), format="png", dpi=90)
  plt.close(fig)
  os.replace(os.path.join(workdir, "pass_at_k.png.tmp"), os.path.join(workdir, "pass_at_k.png"))
