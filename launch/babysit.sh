#!/usr/bin/env bash
# Run JOB to the end on the config's slice through preemptions. Every BABYSIT_INTERVAL seconds:
#  - queued resource ACTIVE: the job is started on the first check (launch/run.sh, which leaves a
#    running job alone); when every worker's $BUCKET/logs/JOB/worker-N.status says 0 it prints
#    "done" and exits 0; a non-zero status other than 143 (SIGTERM) is an error;
#  - SUSPENDED, SUSPENDING, FAILED, DELETING or gone, the node PREEMPTED, or a worker stopped by
#    SIGTERM (143): delete the queued resource, create it again and wait for ACTIVE
#    (launch/create.sh), set it up (launch/setup.sh) and run JOB again (launch/run.sh). The rrtf
#    stages resume: train from the newest checkpoint in its gs:// workdir, sample, rank, prepare
#    and evaluate skip their finished files.
#  - still being provisioned (ACCEPTED, WAITING_FOR_RESOURCES, ...): wait for ACTIVE, set up, run.
# --dry-run prints the commands of one check and one recovery and exits 0.
#   launch/babysit.sh --config FILE [--dry-run] --job JOB [--worker all|N] -- rrtf STAGE ARGS...
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="--config FILE [--dry-run] --job JOB [--worker all|N] -- COMMAND..."

node_info() {  # NODE_STATE (ABSENT if not found, UNKNOWN if describe fails) and NUM_WORKERS
  local out
  NODE_CMD=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${QR_WHERE[@]}"
    --format='value(state,networkEndpoints.len())')
  NODE_STATE=UNKNOWN NUM_WORKERS=0
  if ((DRY_RUN)); then
    run_cmd "${NODE_CMD[@]}"
    return 0
  fi
  if out=$("${NODE_CMD[@]}" 2>&1); then
    read -r NODE_STATE NUM_WORKERS <<<"$out" || true
  elif grep -qiE 'NOT_FOUND|not found|404' <<<"$out"; then
    NODE_STATE=ABSENT
  fi
  [[ ${NUM_WORKERS:-} =~ ^[0-9]+$ ]] || NUM_WORKERS=0
}

read_statuses() {  # FINISHED (workers with status 0), FAILED_WORKER/FAILED_STATUS, TERMINATED
  local out word1 n word3 rc
  STATUS_CMD=(gcloud storage cat "$BUCKET/logs/$JOB/worker-*.status")
  FINISHED=0 FAILED_WORKER="" FAILED_STATUS="" TERMINATED=""
  if ((DRY_RUN)); then
    run_cmd "${STATUS_CMD[@]}"
    return 0
  fi
  out=$("${STATUS_CMD[@]}" 2>/dev/null) || return 0  # no status file yet
  while read -r word1 n word3 rc; do
    [[ $word1 == worker && $word3 == exit && $n =~ ^[0-9]+$ && $rc =~ ^[0-9]+$ ]] || continue
    [[ $WORKER == all || $WORKER == "$n" ]] || continue
    if ((rc == 0)); then
      FINISHED=$((FINISHED + 1))
    elif ((rc == 143)); then
      TERMINATED=$n
    elif [[ -z $FAILED_WORKER ]]; then
      FAILED_WORKER=$n FAILED_STATUS=$rc
    fi
  done <<<"$out"
}

recover() {  # recover WHY: delete (unless still being provisioned), create and wait, set up, run
  local failures=0
  note "$1: (re-)creating $TPU_NAME, setting it up and running $JOB again"
  if ((DRY_RUN)); then
    qr_delete "$QR_STATE"
    qr_create
    step_setup
    step_run
    return 0
  fi
  # Each failure (no capacity yet, ssh not ready, ...) is retried; its one-line reason is printed.
  until (if ! provisioning; then qr_delete "$QR_STATE"; fi && qr_create && step_setup && step_run); do
    failures=$((failures + 1))
    ((failures < BABYSIT_MAX_FAILURES)) || fail 1 "giving up on $TPU_NAME after $failures failed recoveries"
    note "recovery failed ($failures of $BABYSIT_MAX_FAILURES); again in ${BABYSIT_INTERVAL}s"
    sleep "$BABYSIT_INTERVAL"
    qr_state
  done
}

provisioning() {
  case $QR_STATE in
    ACCEPTED | CREATING | PROVISIONING | WAITING_FOR_RESOURCES) return 0 ;;
    *) return 1 ;;
  esac
}

check_once() {  # one check (and recovery); returns 0 when the job is done everywhere
  local expected
  qr_state
  if [[ $QR_STATE != ACTIVE ]]; then
    recover "queued resource $TPU_NAME is $QR_STATE"
    STARTED=1
    return 1
  fi
  node_info
  case $NODE_STATE in
    READY) ;;
    PREEMPTED | TERMINATED | STOPPED | ABSENT)
      recover "node $TPU_NAME is $NODE_STATE"
      STARTED=1
      return 1 ;;
    *)
      note "node $TPU_NAME is $NODE_STATE; next check in ${BABYSIT_INTERVAL}s"
      return 1 ;;
  esac
  if ((!STARTED)); then
    step_run
    STARTED=1
  fi
  read_statuses
  if [[ -n $FAILED_WORKER ]]; then
    fail 1 "$JOB failed on worker $FAILED_WORKER with exit status $FAILED_STATUS: see $BUCKET/logs/$JOB/worker-$FAILED_WORKER.log"
  fi
  if [[ -n $TERMINATED ]]; then
    recover "$JOB got SIGTERM on worker $TERMINATED (exit status 143)"
    return 1
  fi
  expected=$NUM_WORKERS
  [[ $WORKER == all ]] || expected=1
  if ((expected > 0 && FINISHED >= expected)); then
    return 0
  fi
  note "$JOB: $FINISHED of $expected workers finished; next check in ${BABYSIT_INTERVAL}s"
  return 1
}

parse_args "$@"
job_args
load_config
require_slice
require_create
require_bucket
require_source

if ((DRY_RUN)); then
  note "every ${BABYSIT_INTERVAL}s: the queued resource's state"
  qr_describe_cmd
  run_cmd "${QR_DESCRIBE[@]}"
  note "ACTIVE: the node's state and worker count; JOB started once (left alone where it runs); the exit statuses"
  node_info
  step_run
  read_statuses
  note "SUSPENDED, FAILED or gone, node PREEMPTED, or a worker stopped by SIGTERM (143):"
  QR_STATE=SUSPENDED
  recover "recovery"
  exit 0
fi

STARTED=0
until check_once; do
  sleep "$BABYSIT_INTERVAL"
done
printf '%s: done: %s exited 0 on every worker\n' "$PROG" "$JOB"
