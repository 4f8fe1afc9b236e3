# shellcheck shell=bash
# Sourced by the launch scripts (create, setup, run, babysit, delete, vertex): argument parsing,
# the config file, `run_cmd` (prints the command under --dry-run, runs it otherwise) and the
# steps themselves as functions, so that babysit.sh reuses exactly what the other scripts do.
#
# Output conventions: a command about to run is traced on stderr as `+ cmd` (under --dry-run
# it is printed on stdout instead and not run), progress notes start with `# `, and an error is
# one line `launch/NAME.sh: ...` on stderr. Bad usage or a bad config exits 2, a failed step 1.

PROG="launch/${0##*/}"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Every key a config file may set. They are cleared before the file is sourced, so a value
# never leaks in from the environment.
CONFIG_KEYS=(
  PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION CAPACITY RESERVATION
  NETWORK SUBNETWORK SERVICE_ACCOUNT SCOPES BUCKET REPO_URL GIT_REF ARCHIVE PYTHON
  POLL_INTERVAL CREATE_TIMEOUT DELETE_TIMEOUT SSH_RETRIES BABYSIT_INTERVAL BABYSIT_MAX_FAILURES
  REGION IMAGE MACHINE_TYPE TPU_TOPOLOGY
)

fail() {  # fail CODE MESSAGE...: one line on stderr, then exit
  local code=$1
  shift
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit "$code"
}

note() {  # a progress note: on stdout under --dry-run (next to the commands), else on stderr
  if ((DRY_RUN)); then
    printf '# %s\n' "$*"
  else
    printf '# %s\n' "$*" >&2
  fi
}

shquote() {  # one word, quoted for a POSIX shell exactly as Python's shlex.quote does
  local s=$1
  if [[ -z $s ]]; then
    printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_cmd() {  # the words as one shell command line
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shquote "$word")"
  done
  printf '%s' "$out"
}

run_cmd() {  # print the command (--dry-run) or trace and run it
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

must_run() {  # run_cmd, and a failure is an error
  run_cmd "$@" || fail 1 "failed: $(quote_cmd "$@")"
}

first_error_line() {  # gcloud's first ERROR line of $1 (else its first line), prefix dropped
  local line
  line=$(grep -m1 -E '^ERROR' <<<"$1" || true)
  [[ -n $line ]] || line=$(head -n1 <<<"$1")
  line=${line#ERROR: }
  line=${line#\(gcloud*\) }
  printf '%s' "$line"
}

# --- arguments -------------------------------------------------------------------------------

usage() {
  printf 'usage: %s %s\n' "$PROG" "$USAGE"
  exit 0
}

parse_args() {  # sets CONFIG DRY_RUN JOB WORKER CMD
  CONFIG="" DRY_RUN=0 JOB="" WORKER="" CMD=()
  while (($#)); do
    case $1 in
      --config) (($# >= 2)) || fail 2 "--config needs a file"; CONFIG=$2; shift 2 ;;
      --config=*) CONFIG=${1#*=}; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --job) (($# >= 2)) || fail 2 "--job needs a name"; JOB=$2; shift 2 ;;
      --job=*) JOB=${1#*=}; shift ;;
      --worker) (($# >= 2)) || fail 2 "--worker needs all or a number"; WORKER=$2; shift 2 ;;
      --worker=*) WORKER=${1#*=}; shift ;;
      -h | --help) usage ;;
      --) shift; CMD=("$@"); break ;;
      *) fail 2 "unknown argument: $1 (usage: $PROG $USAGE)" ;;
    esac
  done
  [[ -n $CONFIG ]] || fail 2 "--config FILE is required (usage: $PROG $USAGE)"
}

no_job_args() {  # for the scripts that take no --job, --worker or command
  [[ -z $JOB ]] || fail 2 "--job is not an option of this script"
  [[ -z $WORKER ]] || fail 2 "--worker is not an option of this script"
  ((${#CMD[@]} == 0)) || fail 2 "this script takes no command after --"
}

job_args() {  # --job NAME [--worker all|N] -- COMMAND...
  [[ -n $JOB ]] || fail 2 "--job NAME is required (usage: $PROG $USAGE)"
  [[ $JOB =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || fail 2 "--job $JOB: use letters, digits, '.', '_' and '-'"
  WORKER=${WORKER:-all}
  [[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || fail 2 "--worker $WORKER: all or a worker number"
  ((${#CMD[@]})) || fail 2 "the command to run goes after -- (usage: $PROG $USAGE)"
}

# --- the config file -------------------------------------------------------------------------

load_config() {
  [[ -f $CONFIG ]] || fail 2 "config $CONFIG: no such file"
  [[ -r $CONFIG ]] || fail 2 "config $CONFIG: not readable"
  unset "${CONFIG_KEYS[@]}"
  # shellcheck source=/dev/null
  source "$CONFIG"
  PYTHON=${PYTHON:-python3.11}
  POLL_INTERVAL=${POLL_INTERVAL:-30}
  CREATE_TIMEOUT=${CREATE_TIMEOUT:-7200}
  DELETE_TIMEOUT=${DELETE_TIMEOUT:-1800}
  SSH_RETRIES=${SSH_RETRIES:-3}
  BABYSIT_INTERVAL=${BABYSIT_INTERVAL:-300}
  BABYSIT_MAX_FAILURES=${BABYSIT_MAX_FAILURES:-20}
  local key
  for key in POLL_INTERVAL CREATE_TIMEOUT DELETE_TIMEOUT SSH_RETRIES BABYSIT_INTERVAL BABYSIT_MAX_FAILURES; do
    [[ ${!key} =~ ^[0-9]+$ ]] || fail 2 "config $CONFIG: $key must be a whole number of seconds or tries, not '${!key}'"
  done
}

require() {  # require KEY...: each set and not empty
  local key
  for key in "$@"; do
    [[ -n ${!key:-} ]] || fail 2 "config $CONFIG: $key is not set"
  done
}

require_slice() {  # the keys every Cloud TPU script needs
  require PROJECT ZONE TPU_NAME
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    fail 2 "config $CONFIG: TPU_NAME '$TPU_NAME' must be lowercase letters, digits and '-', starting with a letter"
  QR_WHERE=(--project="$PROJECT" --zone="$ZONE")
}

require_create() {
  require ACCELERATOR_TYPE RUNTIME_VERSION CAPACITY
  case $CAPACITY in
    spot | reserved | on-demand) ;;
    *) fail 2 "config $CONFIG: CAPACITY must be spot, reserved or on-demand, not '$CAPACITY'" ;;
  esac
  [[ -z ${RESERVATION:-} || $CAPACITY == reserved ]] ||
    fail 2 "config $CONFIG: RESERVATION is set but CAPACITY is $CAPACITY, not reserved"
}

require_bucket() {
  require BUCKET
  [[ $BUCKET =~ ^gs://[^/]+ ]] || fail 2 "config $CONFIG: BUCKET must be a gs:// URL, not '$BUCKET'"
  BUCKET=${BUCKET%/}
}

require_source() {  # REPO_URL + GIT_REF, or ARCHIVE
  if [[ -n ${ARCHIVE:-} ]]; then
    [[ -z ${REPO_URL:-} ]] || fail 2 "config $CONFIG: set REPO_URL (with GIT_REF) or ARCHIVE, not both"
    [[ -f $ARCHIVE ]] || fail 2 "config $CONFIG: ARCHIVE $ARCHIVE: no such file"
  elif [[ -n ${REPO_URL:-} ]]; then
    require GIT_REF
  else
    fail 2 "config $CONFIG: REPO_URL (with GIT_REF) or ARCHIVE is not set"
  fi
}

# --- queued resources ------------------------------------------------------------------------

is_capacity_error() {
  grep -qiE 'quota|RESOURCE_EXHAUSTED|capacity|stockout|insufficient|no more' <<<"$1"
}

capacity_hint() {
  printf 'no capacity or quota for %s %s in %s (project %s): %s: try another zone, another capacity type or later' \
    "$ACCELERATOR_TYPE" "$CAPACITY" "$ZONE" "$PROJECT" "$1"
}

qr_describe_cmd() {  # the describe command, printing the queued resource's state
  QR_DESCRIBE=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${QR_WHERE[@]}" --format='value(state.state)')
}

qr_state() {  # QR_STATE: the queued resource's state, or ABSENT
  local out
  qr_describe_cmd
  if out=$("${QR_DESCRIBE[@]}" 2>&1); then
    QR_STATE=$(tr -d '[:space:]' <<<"$out")
    [[ -n $QR_STATE ]] || QR_STATE=UNKNOWN
  elif grep -qiE 'NOT_FOUND|not found|404' <<<"$out"; then
    QR_STATE=ABSENT
  else
    fail 1 "cannot describe queued resource $TPU_NAME: $(first_error_line "$out")"
  fi
}

qr_create_cmd() {
  QR_CREATE=(gcloud)
  [[ -z ${RESERVATION:-} ]] || QR_CREATE+=(alpha)  # --reservation is an alpha flag (gcloud 528)
  QR_CREATE+=(compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME"
    "${QR_WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  case $CAPACITY in
    spot) QR_CREATE+=(--spot) ;;
    reserved) QR_CREATE+=(--reserved) ;;
  esac
  [[ -z ${RESERVATION:-} ]] || QR_CREATE+=(--reservation="$RESERVATION")
  [[ -z ${NETWORK:-} ]] || QR_CREATE+=(--network="$NETWORK")
  [[ -z ${SUBNETWORK:-} ]] || QR_CREATE+=(--subnetwork="$SUBNETWORK")
  [[ -z ${SERVICE_ACCOUNT:-} ]] || QR_CREATE+=(--service-account="$SERVICE_ACCOUNT")
  [[ -z ${SCOPES:-} ]] || QR_CREATE+=(--scopes="$SCOPES")
}

qr_create() {  # create the queued resource unless it exists, then wait until ACTIVE
  local out
  qr_create_cmd
  qr_describe_cmd
  if ((DRY_RUN)); then
    note "does queued resource $TPU_NAME exist already? then it is not created again"
    run_cmd "${QR_DESCRIBE[@]}"
    run_cmd "${QR_CREATE[@]}"
    note "then every ${POLL_INTERVAL}s until ACTIVE (at most ${CREATE_TIMEOUT}s); FAILED or SUSPENDED is an error"
    run_cmd "${QR_DESCRIBE[@]}"
    return 0
  fi
  qr_state
  if [[ $QR_STATE == ABSENT ]]; then
    printf '+ %s\n' "$(quote_cmd "${QR_CREATE[@]}")" >&2
    if ! out=$("${QR_CREATE[@]}" 2>&1); then
      if is_capacity_error "$out"; then
        fail 1 "$(capacity_hint "$(first_error_line "$out")")"
      fi
      fail 1 "cannot create queued resource $TPU_NAME: $(first_error_line "$out")"
    fi
  else
    note "queued resource $TPU_NAME exists ($QR_STATE): not creating it again"
  fi
  qr_wait_active
}

qr_wait_active() {
  local start=$SECONDS reason
  while :; do
    qr_state
    case $QR_STATE in
      ACTIVE)
        note "queued resource $TPU_NAME is ACTIVE"
        return 0 ;;
      FAILED)
        reason=$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${QR_WHERE[@]}" \
          --format='value(state.failedData.error.message)' 2>/dev/null | head -n1 || true)
        if is_capacity_error "$reason"; then
          fail 1 "$(capacity_hint "queued resource FAILED: $reason")"
        fi
        fail 1 "queued resource $TPU_NAME FAILED: ${reason:-no reason given}: delete it (launch/delete.sh) before creating it again" ;;
      SUSPENDING | SUSPENDED)
        fail 1 "queued resource $TPU_NAME is $QR_STATE (preempted or maintenance): delete it (launch/delete.sh) and create it again, or let launch/babysit.sh do that" ;;
      DELETING | ABSENT)
        fail 1 "queued resource $TPU_NAME is $QR_STATE while waiting for it to become ACTIVE" ;;
    esac
    if ((SECONDS - start >= CREATE_TIMEOUT)); then
      fail 1 "queued resource $TPU_NAME still $QR_STATE after ${CREATE_TIMEOUT}s: $(capacity_hint "not provisioned yet") (it stays queued until launch/delete.sh; CREATE_TIMEOUT waits longer)"
    fi
    note "queued resource $TPU_NAME is $QR_STATE; next check in ${POLL_INTERVAL}s"
    sleep "$POLL_INTERVAL"
  done
}

qr_delete() {  # delete the queued resource and its node; absent is fine. $1=known state (optional)
  local state=${1:-} out start=$SECONDS
  local cmd=(gcloud compute tpus queued-resources delete "$TPU_NAME" "${QR_WHERE[@]}" --force --quiet)
  qr_describe_cmd
  if ((DRY_RUN)); then
    if [[ -z $state ]]; then
      note "absent already? then there is nothing to delete"
      run_cmd "${QR_DESCRIBE[@]}"
    fi
    run_cmd "${cmd[@]}"
    note "then every ${POLL_INTERVAL}s until describe says NOT_FOUND (at most ${DELETE_TIMEOUT}s)"
    return 0
  fi
  if [[ -z $state ]]; then
    qr_state
    state=$QR_STATE
  fi
  if [[ $state == ABSENT ]]; then
    note "no queued resource $TPU_NAME: nothing to delete"
    return 0
  fi
  if [[ $state != DELETING ]]; then
    printf '+ %s\n' "$(quote_cmd "${cmd[@]}")" >&2
    if ! out=$("${cmd[@]}" 2>&1) && ! grep -qiE 'NOT_FOUND|not found|404' <<<"$out"; then
      fail 1 "cannot delete queued resource $TPU_NAME: $(first_error_line "$out")"
    fi
  fi
  while qr_state && [[ $QR_STATE != ABSENT ]]; do
    if ((SECONDS - start >= DELETE_TIMEOUT)); then
      fail 1 "queued resource $TPU_NAME still $QR_STATE ${DELETE_TIMEOUT}s after the delete"
    fi
    note "queued resource $TPU_NAME is $QR_STATE; next check in ${POLL_INTERVAL}s"
    sleep "$POLL_INTERVAL"
  done
  note "queued resource $TPU_NAME deleted"
}

# --- the workers -----------------------------------------------------------------------------
# launch/worker.sh does the work on each worker. It is staged in the bucket and every remote
# command fetches it first, so the workers always run this checkout's copy.

worker_script_cmds() {  # STAGE_CMD (upload) and REMOTE_PREFIX (fetch and run on a worker)
  local gs="$BUCKET/launch/worker.sh"
  STAGE_CMD=(gcloud storage cp "$LAUNCH_DIR/worker.sh" "$gs")
  REMOTE_PREFIX="mkdir -p ~/rrtf-launch && gcloud storage cp $(shquote "$gs") ~/rrtf-launch/worker.sh && bash ~/rrtf-launch/worker.sh"
}

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND: on those workers, retried (it is idempotent)
  local worker=$1 remote=$2 try=1
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${QR_WHERE[@]}" --worker="$worker" --command="$remote")
  if ((DRY_RUN)); then
    run_cmd "${cmd[@]}"
    return 0
  fi
  until run_cmd "${cmd[@]}"; do
    ((try < SSH_RETRIES)) || fail 1 "ssh to $TPU_NAME worker(s) $worker failed $try times"
    note "ssh failed (try $try of $SSH_RETRIES); again in ${POLL_INTERVAL}s"
    sleep "$POLL_INTERVAL"
    try=$((try + 1))
  done
}

step_setup() {  # install the project with its tpu extra on every worker
  local source
  worker_script_cmds
  if [[ -n ${ARCHIVE:-} ]]; then
    local gs_archive
    gs_archive="$BUCKET/launch/src/$(basename "$ARCHIVE")"
    must_run gcloud storage cp "$ARCHIVE" "$gs_archive"
    source="--archive $(shquote "$gs_archive")"
  else
    source="--git $(shquote "$REPO_URL") $(shquote "$GIT_REF")"
  fi
  must_run "${STAGE_CMD[@]}"
  ssh_workers all "$REMOTE_PREFIX setup $source --python $(shquote "$PYTHON")"
}

step_run() {  # start JOB's command, detached, on WORKER (all or one); a running JOB is left alone
  worker_script_cmds
  must_run "${STAGE_CMD[@]}"
  ssh_workers "$WORKER" "$REMOTE_PREFIX run $(shquote "$JOB") $(shquote "$BUCKET/logs/$JOB") -- $(quote_cmd "${CMD[@]}")"
}
