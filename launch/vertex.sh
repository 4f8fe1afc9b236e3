#!/usr/bin/env bash
# Submit a single-host rrtf run as a Vertex AI custom job: one replica of IMAGE (built from
# launch/Dockerfile, ENTRYPOINT rrtf) on MACHINE_TYPE, a TPU host (ct5lp-hightpu-4t with
# TPU_TOPOLOGY=2x2) or a CPU machine (n2-standard-8, no TPU_TOPOLOGY).
#   launch/vertex.sh --config launch/configs/vertex-v5e-4.env [--dry-run] --job NAME -- rrtf STAGE ARGS...
# The job's display name is NAME and the container gets STAGE ARGS... as its arguments.
# CPU: the command line's --worker-pool-spec says it all. TPU: --worker-pool-spec has no TPU
# topology key (gcloud 528), so the worker pool goes in a CustomJobSpec YAML file passed with
# --config ($TMPDIR/rrtf-vertex-NAME.yaml, written also under --dry-run and shown there).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="--config FILE [--dry-run] --job NAME -- rrtf STAGE ARGS..."

yaml_string() {  # a YAML double-quoted scalar
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

args_flag() {  # ARGS_FLAG: --args=A,B,... with gcloud's ^DELIM^ prefix when an argument holds a comma
  local joined delim="" d arg
  if [[ "${ARGS[*]}" == *,* ]]; then
    for d in ';' '|' '~' '#' '!' '%'; do
      if [[ "${ARGS[*]}" != *"$d"* ]]; then
        delim=$d
        break
      fi
    done
    [[ -n $delim ]] || fail 2 "the arguments hold commas and every other delimiter gcloud could use"
  fi
  joined=""
  for arg in "${ARGS[@]}"; do
    joined+="${joined:+${delim:-,}}$arg"
  done
  if [[ -n $delim ]]; then
    ARGS_FLAG="--args=^$delim^$joined"
  else
    ARGS_FLAG="--args=$joined"
  fi
}

parse_args "$@"
[[ -z $WORKER ]] || fail 2 "--worker is not an option of vertex.sh (one replica)"
job_args
[[ ${CMD[0]} == rrtf ]] || fail 2 "the command after -- must be rrtf ... (the image's entrypoint), not ${CMD[0]}"
((${#CMD[@]} >= 2)) || fail 2 "rrtf needs a stage: rrtf STAGE ARGS..."
ARGS=("${CMD[@]:1}")
load_config
require PROJECT REGION IMAGE MACHINE_TYPE

SUBMIT=(gcloud ai custom-jobs create --project="$PROJECT" --region="$REGION" --display-name="$JOB")
if [[ -n ${TPU_TOPOLOGY:-} ]]; then
  SPEC="${TMPDIR:-/tmp}/rrtf-vertex-$JOB.yaml"
  {
    printf 'workerPoolSpecs:\n'
    printf -- '- machineSpec:\n'
    printf '    machineType: %s\n' "$(yaml_string "$MACHINE_TYPE")"
    printf '    tpuTopology: %s\n' "$(yaml_string "$TPU_TOPOLOGY")"
    printf '  replicaCount: 1\n'
    printf '  containerSpec:\n'
    printf '    imageUri: %s\n' "$(yaml_string "$IMAGE")"
    printf '    args:\n'
    for arg in "${ARGS[@]}"; do
      printf '    - %s\n' "$(yaml_string "$arg")"
    done
  } >"$SPEC"
  if ((DRY_RUN)); then
    note "$SPEC:"
    while IFS= read -r line; do
      note "  $line"
    done <"$SPEC"
  fi
  SUBMIT+=(--config="$SPEC")
else
  args_flag
  SUBMIT+=(--worker-pool-spec="machine-type=$MACHINE_TYPE,replica-count=1,container-image-uri=$IMAGE"
    "$ARGS_FLAG")
fi
[[ -z ${SERVICE_ACCOUNT:-} ]] || SUBMIT+=(--service-account="$SERVICE_ACCOUNT")
must_run "${SUBMIT[@]}"
