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
import glob
import json
import os
import time

from data.problems import InputError, read_jsonl, write_jsonl_atomic, write_text_atomic

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
  seq_len: int = 192  # prompt (<= ~80 tokens) + signature and docstring + max_new_tokens; longer is cut
  buckets: str = "128,192"
  max_new_tokens: int = 64
  chunk: int = 16  # decode steps per host round trip
  max_batch: int = 64  # rows decoded together


DEFAULT = Sizes(warmup=256, train=128, heldout=128, warmup_steps=300, warmup_lr=3e-3, rrtf_steps=250,
                rrtf_lr=3e-3, batch=16, responses=4, samples=6, temperatures=(0.4, 0.8, 1.2), eval_n=10,
                eval_temperature=0.8, ks=(1, 5, 10))
QUICK = Sizes(warmup=32, train=16, heldout=16, warmup_steps=30, warmup_lr=3e-3, rrtf_steps=10, rrtf_lr=3e-3,
              batch=8, responses=3, samples=2, temperatures=(0.8,), eval_n=4, eval_temperature=0.8, ks=(1, 4),
              seq_len=192, buckets="192", max_new_tokens=48)


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
      raise InputError(f"{path}: this workdir was made with other settings ({', '.join(diff)} differ); "
                       "use another --workdir or remove it")
  else:
    os.makedirs(workdir, exist_ok=True)
    write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def _train_config(sizes: Sizes, seed: int, data_dir: str, *, steps: int, lr: float, responses: int,
                  init_from: str = "", rank_weight: float = 1.0):
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
  t.checkpoint_every = max(50, steps // 4)  # each save costs about a second here
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
    save_checkpoint(model_dir, ModelConfig.from_dict(config.model), result.params, tokenizer_dir=tokenizer_dir)
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
          out.setdefault(v.tag[len("train/"):], {})[int(event.step)] = float(v.simple_value)
  return {k: sorted(v.items()) for k, v in out.items()}


def _compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache unless it is configured already
  (JAX_COMPILATION_CACHE_DIR): a resumed demo, another seed or the next run skips the
  compiles, most of the quick demo's time on CPU. Default ~/.cache/rrtf-jax/jax, as MaxText
  keeps one in ~/jax_cache."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "rrtf-jax", "jax"))
  return jax.config.jax_compilation_cache_dir


def run_demo(workdir: str, seed: int = 0, quick: bool = False, ablation: bool = False,
             progress: bool = True) -> dict:
  from data import synthetic
  from rrtf_jax.stages.prepare import prepare_stage
  from data.tokenizer import builtin_corpus, train_sentencepiece
  from model.decode import Decoder
  from rrtf_jax.config_loading import load_config
  from rrtf_jax.stages.evaluate import evaluate
  from rrtf_jax.stages.rank import rank_stage
  from rrtf_jax.stages.sample import Teacher, load_problems, load_teacher_file, sample_stage

  t0 = time.perf_counter()
  sizes = QUICK if quick else DEFAULT
  workdir = os.path.abspath(workdir)
  _check_settings(workdir, {"seed": seed, "quick": quick, "sizes": json.loads(json.dumps(dataclasses.asdict(sizes)))})
  _compilation_cache()
  P = lambda *parts: os.path.join(workdir, *parts)  # noqa: E731
  stages = _Stages(workdir, 10 + (2 if ablation else 0))
  tok_dir = P("tokenizer")
  problems = {s: P("problems", f"{s}.jsonl") for s in synthetic.SPLITS}

  def make_problems():
    parts = synthetic.splits(seed, sizes.warmup, sizes.train, sizes.heldout)
    for name, rows in parts.items():
      write_jsonl_atomic(problems[name], rows)
      write_jsonl_atomic(P("problems", f"{name}-references.jsonl"),
                         [{"task_id": p["task_id"], "completion": p["canonical_solution"], "model": "reference"}
                          for p in rows])
    return {"note": ", ".join(f"{k} {len(v)}" for k, v in parts.items()) + " problems",
            "families": len(synthetic.FAMILIES), **{k: len(v) for k, v in parts.items()}}

  stages.run("problems", "synthetic problems", make_problems)

  def make_tokenizer():
    texts = [r["prompt"] + r["canonical_solution"] for s in ("warmup", "train")
             for _, r in read_jsonl(problems[s], ("prompt", "canonical_solution"))]
    vocab = int(load_config("tiny").tokenizer.vocab_size)
    tok = train_sentencepiece(builtin_corpus() + texts, tok_dir, vocab_size=vocab)
    return {"note": f"{tok.vocab_size}-piece SentencePiece", "vocab_size": tok.vocab_size}

  stages.run("tokenizer", "tokenizer", make_tokenizer)

  def references(split: str) -> Teacher:
    return Teacher(answers=load_teacher_file(P("problems", f"{split}-references.jsonl"), load_problems(problems[split])))

  def rank_and_prepare(name: str, keep_student_wins: bool = False) -> dict:
    r = rank_stage(P("data", name, "samples"), P("data", name, "ranked"), keep_student_wins=keep_student_wins,
                   progress=progress)
    prepare_stage(P("data", name, "ranked"), P("data", name, "prepared"), tok_dir, progress=progress)
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r.outcomes.items()))
    return {"problems": r.problems, "kept": r.kept, "responses": r.responses, "outcomes": dict(r.outcomes),
            "note": f"{r.responses} responses to {r.problems} problems ({outcomes}); {r.kept} problems kept"}

  def warm_up():
    sample_stage(problems["warmup"], P("data", "warmup", "samples"), num_samples=0, teacher=references("warmup"),
                 seed=seed, progress=progress)
    ranked = rank_and_prepare("warmup")
    config = _train_config(sizes, seed, P("data", "warmup", "prepared"), steps=sizes.warmup_steps,
                           lr=sizes.warmup_lr, responses=1)
    out = _train(config, P("train", "warmup"), P("models", "base"), tok_dir, progress)
    return {"note": f"{out['steps']} steps of fine-tuning on {sizes.warmup} reference solutions", **out,
            "ranked": ranked}

  stages.run("warmup", "warm-up fine-tuning", warm_up)

  decoders: dict[str, Decoder] = {}

  def decoder(name: str):
    def get():
      if name not in decoders:
        decoders[name] = Decoder.from_checkpoint(P("models", name), chunk=sizes.chunk, max_batch=sizes.max_batch, seed=seed)
      return decoders[name]
    return get

  def evaluate_model(name: str) -> dict:
    def run():
      common = dict(max_new_tokens=sizes.max_new_tokens, seed=seed, decoder=decoder(name), progress=progress)
      greedy = evaluate(P("models", name), problems["heldout"], P("eval", f"{name}-greedy"), greedy=True, **common).summary
      sampled = evaluate(P("models", name), problems["heldout"], P("eval", f"{name}-sampled"), n=sizes.eval_n,
                         temperature=sizes.eval_temperature, top_p=0.95, ks=sizes.ks, **common).summary
      out = {"pass@1": greedy["pass@k"]["pass@1"], "pass@k": sampled["pass@k"],
             "outcomes_greedy": greedy["outcomes"], "outcomes_sampled": sampled["outcomes"]}
      figures = ", ".join(f"{k} {v:.3f}" for k, v in out["pass@k"].items())
      out["note"] = f"greedy pass@1 {out['pass@1']:.3f}; sampled (n={sizes.eval_n}) {figures}"
      return out
    return stages.run(f"eval_{name}", f"evaluate {name} on {sizes.heldout} held-out problems", run)

  results = {"base": evaluate_model("base")}

  def sample_train():
    s = sample_stage(problems["train"], P("data", "rrtf", "samples"), decoder=decoder("base")(),
                     num_samples=sizes.samples, temperatures=sizes.temperatures, top_p=0.95,
                     max_new_tokens=sizes.max_new_tokens, teacher=references("train"), seed=seed, progress=progress)
    return {"note": f"{s.student_responses} student and {s.teacher_responses} reference responses",
            "student_responses": s.student_responses, "teacher_responses": s.teacher_responses}

  stages.run("sample", f"sample {sizes.samples} responses per training problem", sample_train)

  stages.run("rank", "rank in the sandbox and prepare", lambda: rank_and_prepare("rrtf"))

  def heldout_ranked():
    """The base model's sampled held-out responses plus the references, ranked: the set on
    which every model's ranking accuracy is measured."""
    from data import records
    from rrtf_jax.stages.sample import SAMPLES_NAME
    by_task: dict[str, list[str]] = {}
    with open(P("eval", "base-sampled", "samples.jsonl")) as f:
      for line in f:
        r = json.loads(line)
        by_task.setdefault(r["task_id"], []).append(r["completion"])
    refs = references("heldout").answers
    recs = []
    for p in load_problems(problems["heldout"]):
      students = by_task[p.task_id]
      ref = [code for _, code, _ in refs[p.task_id]]
      recs.append(dict(task_id=p.task_id, prompt=p.prompt, test=p.test, entry_point=p.entry_point,
                       exec_prefix=p.exec_prefix, sources=["base"] * len(students) + ["reference"],
                       responses=students + ref, codes=students + ref, is_teacher=[0] * len(students) + [1]))
    os.makedirs(P("data", "heldout", "samples"), exist_ok=True)
    records.write_atomic(P("data", "heldout", "samples", records.shard_name(SAMPLES_NAME, "train", 0, 1)), recs,
                         ranked=False)
    return rank_and_prepare("heldout", keep_student_wins=True)

  stages.run("heldout_ranked", "rank the base model's held-out samples (for ranking accuracy)", heldout_ranked)

  def train_model(name: str, rank_weight: float, title: str):
    def run():
      config = _train_config(sizes, seed, P("data", "rrtf", "prepared"), steps=sizes.rrtf_steps,
                             lr=sizes.rrtf_lr, responses=sizes.responses, init_from=P("models", "base"),
                             rank_weight=rank_weight)
      out = _train(config, P("train", name), P("models", name), tok_dir, progress)
      return {"note": f"{out['steps']} steps", **out}
    stages.run(f"train_{name}", title, run)

  train_model("rrtf", 1.0, "RRTF training (ranking loss + cross-entropy on the best response)")
  results["rrtf"] = evaluate_model("rrtf")
  if ablation:
    train_model("ablation", 0.0, "ablation: the same training with the ranking loss off")
    results["ablation"] = evaluate_model("ablation")

  def accuracy():
    from rrtf_jax.train_step import ranking_metrics
    from model import load_checkpoint
    config = _train_config(sizes, seed, "", steps=1, lr=1.0, responses=1)
    loaded = {name: load_checkpoint(P("models", name)) for name in MODELS if name in results}
    params = {name: p for name, (_, p) in loaded.items()}
    out = ranking_metrics(loaded["base"][0], config.train, params, P("data", "heldout", "prepared"),
                          responses=sizes.eval_n + 1)
    return {"note": ", ".join(f"{k} {v['ranking_accuracy']:.3f}" for k, v in out.items()), "models": out}

  acc = stages.run("ranking_accuracy" + ("_ablation" if ablation else ""), "ranking accuracy on held-out responses",
                   accuracy)
  summary = _summarize(workdir, sizes, seed, quick, results, acc["models"])
  summary["seconds"] = round(time.perf_counter() - t0, 1)
  write_text_atomic(P("summary.json"), json.dumps(summary, indent=2) + "\n")
  write_text_atomic(P("report.md"), report_markdown(summary))
  _plots(workdir, summary)
  print(table(summary), flush=True)
  _say(f"done in {summary['seconds']:.0f} s; report in {P('report.md')}, summary in {P('summary.json')}, "
       f"plots {P('curves.png')} and {P('pass_at_k.png')}")
  return summary


def _summarize(workdir: str, sizes: Sizes, seed: int, quick: bool, results: dict, accuracy: dict) -> dict:
  evaluation = {"problems": sizes.heldout, "split": "heldout", "pass@1": "greedy", "n": sizes.eval_n,
                "temperature": sizes.eval_temperature, "top_p": 0.95, "max_new_tokens": sizes.max_new_tokens}
  base = {"model": "tiny config, random init", "warmup_problems": sizes.warmup, "steps": sizes.warmup_steps,
          "learning_rate": sizes.warmup_lr, "batch_size": sizes.batch, "responses": 1}
  trained = {"init_from": "base", "train_problems": sizes.train, "steps": sizes.rrtf_steps,
             "learning_rate": sizes.rrtf_lr, "batch_size": sizes.batch, "responses": sizes.responses,
             "student_samples": sizes.samples, "temperatures": list(sizes.temperatures), "teacher": "reference solutions"}
  settings = {"base": base, "rrtf": dict(trained, rank_weight=1.0), "ablation": dict(trained, rank_weight=0.0)}
  out = {}
  for name in MODELS:
    if name not in results:
      out[name] = None
      continue
    r = results[name]
    out[name] = {"pass@1": r["pass@1"], "pass@k": r["pass@k"],
                 "ranking_accuracy": accuracy[name]["ranking_accuracy"], "ranking_pairs": accuracy[name]["pairs"],
                 "outcomes": r["outcomes_sampled"], "settings": dict(settings[name], evaluation=evaluation)}
  out.update(seed=seed, quick=quick, workdir=workdir,
             curves={name: _curves(os.path.join(workdir, "train", name))
                     for name in ("warmup", "rrtf", "ablation") if os.path.isdir(os.path.join(workdir, "train", name))})
  return out


def _columns(summary: dict) -> list[str]:
  return ["pass@1 (greedy)"] + [f"{k} (n={summary['base']['settings']['evaluation']['n']})"
                                for k in summary["base"]["pass@k"]] + ["ranking accuracy"]


def _rows(summary: dict) -> list[tuple[str, list[float]]]:
  return [(name, [r["pass@1"], *r["pass@k"].values(), r["ranking_accuracy"]])
          for name in MODELS if (r := summary.get(name)) is not None]


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
      f"# rrtf demo (seed {summary['seed']}{', quick' if summary['quick'] else ''})", "",
      f"Held-out: {ev['problems']} synthetic problems no training split contains. pass@1 (greedy) decodes "
      f"greedily; pass@k uses n={ev['n']} samples at temperature {ev['temperature']}, top-p {ev['top_p']} "
      "(unbiased estimator). Ranking accuracy: over pairs of the base model's held-out samples and the "
      "references with different scores, how often a model gives the better one the higher mean log-probability.",
      "", "| model | " + " | ".join(_columns(summary)) + " |", "|---" * (len(_columns(summary)) + 1) + "|"]
  lines += [f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for name, vals in _rows(summary)]
  delta = r["pass@1"] - b["pass@1"]
  lines += ["", f"RRTF changed greedy pass@1 by {delta:+.3f} over the base model."]
  if summary.get("ablation"):
    lines.append(f"The ablation (ranking loss off, same steps) changed it by "
                 f"{summary['ablation']['pass@1'] - b['pass@1']:+.3f}.")
  lines += ["", "## Settings", ""]
  for name in MODELS:
    if summary.get(name):
      s = {k: v for k, v in summary[name]["settings"].items() if k != "evaluation"}
      lines.append(f"- **{name}**: " + ", ".join(f"{k} {v}" for k, v in s.items()))
  lines += ["", "Plots: `curves.png` (loss terms and ranking accuracy per training step), `pass_at_k.png`.",
            "This is a toy: a 2-layer model on a synthetic family shows the mechanics and the direction of "
            "the effect, not StarCoder-scale numbers.", ""]
  return "\n".join(lines)


def _plots(workdir: str, summary: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  curves = summary["curves"]
  tags = [("loss", "total loss"), ("rank_loss", "ranking loss"), ("ft_loss", "fine-tuning loss (sum per prompt)"),
          ("ranking_accuracy", "ranking accuracy (training batch)")]
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
