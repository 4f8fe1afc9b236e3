#!/usr/bin/env bash
# Runs on each Cloud TPU VM worker; launch/setup.sh and launch/run.sh stage it in the bucket and
# their ssh command fetches it to ~/rrtf-launch/worker.sh and runs it on every worker:
#
#   worker.sh setup (--git REPO_URL GIT_REF | --archive gs://...) [--python python3.11]
#       the project in ~/rrtf-jax at that ref (or unpacked from that archive), installed with its
#       tpu extra into the venv ~/rrtf-venv; running it again is harmless
#   worker.sh run JOB gs://BUCKET/logs/JOB -- COMMAND...
#       COMMAND detached from the ssh session (setsid, nohup), output in ~/rrtf-logs/JOB.log,
#       copied to gs://.../worker-N.log every minute and at the end; when it ends its exit status
#       goes to gs://.../worker-N.status as "worker N exit STATUS". N is this worker's number from
#       the metadata server. While JOB still runs on this worker, another `run JOB` does nothing.
#
# All the code is in functions and the last line runs main and exits, so a copy of this file
# replaced while a job runs cannot change what the running job's shell executes.
set -euo pipefail

SRC_DIR=${RRTF_SRC_DIR:-$HOME/rrtf-jax}
VENV=${RRTF_VENV:-$HOME/rrtf-venv}
LOG_DIR=${RRTF_LOG_DIR:-$HOME/rrtf-logs}
LOG_SYNC_INTERVAL=${RRTF_LOG_SYNC_INTERVAL:-60}
METADATA_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number

say() {
  printf 'worker %s: %s\n' "${WORKER_NUMBER:-?}" "$*"
}

die() {
  printf 'worker %s: %s\n' "${WORKER_NUMBER:-?}" "$*" >&2
  exit 1
}

worker_number() {  # WORKER_NUMBER: this worker's index in the slice
  WORKER_NUMBER=$(curl -s -f -H Metadata-Flavor:Google "$METADATA_URL") ||
    die "cannot read the worker number from the metadata server ($METADATA_URL)"
  [[ $WORKER_NUMBER =~ ^[0-9]+$ ]] || die "the metadata server's worker number is '$WORKER_NUMBER'"
}

# --- setup -----------------------------------------------------------------------------------

ensure_python() {  # a Python with venv and ensurepip; from apt (python3.X, python3.X-venv) if missing
  local py=$1
  if command -v "$py" >/dev/null && "$py" -c 'import ensurepip, venv' 2>/dev/null; then
    return 0
  fi
  if [[ $py =~ ^python3\.[0-9]+$ ]] && command -v apt-get >/dev/null; then
    say "installing $py and $py-venv with apt-get"
    sudo DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
    sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 install "$py" "$py-venv" >/dev/null
  fi
  if ! command -v "$py" >/dev/null || ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
    die "$py with venv is not available (set PYTHON in the config, or install it on the image)"
  fi
}

checkout_git() {  # checkout_git URL REF: ~/rrtf-jax at REF (a branch, tag or commit)
  local url=$1 ref=$2 rev
  command -v git >/dev/null || die "git is not installed"
  if [[ ! -d $SRC_DIR/.git ]]; then
    rm -rf "$SRC_DIR"
    git clone --quiet "$url" "$SRC_DIR"
  fi
  git -C "$SRC_DIR" remote set-url origin "$url"
  git -C "$SRC_DIR" fetch --quiet --force --prune --tags origin
  rev=$(git -C "$SRC_DIR" rev-parse -q --verify "refs/remotes/origin/$ref^{commit}" ||
    git -C "$SRC_DIR" rev-parse -q --verify "$ref^{commit}") || die "$url has no branch, tag or commit $ref"
  git -C "$SRC_DIR" checkout --quiet --force --detach "$rev"
  say "$SRC_DIR at $ref ($rev)"
}

unpack_archive() {  # unpack_archive gs://...: ~/rrtf-jax replaced by the archive's project
  local gs=$1 tmp root entries
  tmp=$(mktemp -d)
  gcloud storage cp "$gs" "$tmp/source" >/dev/null 2>&1 || die "cannot copy $gs"
  mkdir "$tmp/x"
  tar -xf "$tmp/source" -C "$tmp/x" || die "$gs: not a tar archive (.tar, .tar.gz, ...)"
  root=$tmp/x
  if [[ ! -f $root/setup.py ]]; then
    entries=("$root"/*)
    if ((${#entries[@]} == 1)) && [[ -f ${entries[0]}/setup.py ]]; then
      root=${entries[0]}
    else
      die "$gs: no setup.py at the top of the archive or of its single folder"
    fi
  fi
  rm -rf "$SRC_DIR"
  mv "$root" "$SRC_DIR"
  rm -rf "$tmp"
  say "$SRC_DIR unpacked from $gs"
}

cmd_setup() {
  local python=python3.11 git_url="" git_ref="" archive=""
  while (($#)); do
    case $1 in
      --git) (($# >= 3)) || die "setup --git needs URL REF"; git_url=$2; git_ref=$3; shift 3 ;;
      --archive) (($# >= 2)) || die "setup --archive needs gs://..."; archive=$2; shift 2 ;;
      --python) (($# >= 2)) || die "setup --python needs a name"; python=$2; shift 2 ;;
      *) die "setup: unknown argument $1" ;;
    esac
  done
  [[ -n $git_url || -n $archive ]] || die "setup needs --git URL REF or --archive gs://..."
  worker_number
  ensure_python "$python"
  if [[ -n $archive ]]; then
    unpack_archive "$archive"
  else
    checkout_git "$git_url" "$git_ref"
  fi
  [[ -x $VENV/bin/python ]] || "$python" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "${SRC_DIR}[tpu]"
  "$VENV/bin/rrtf" --help >/dev/null || die "rrtf does not start after the install"
  say "installed ${SRC_DIR}[tpu] into $VENV"
}

# --- run -------------------------------------------------------------------------------------

cmd_run() {
  if (($# < 4)) || [[ $3 != -- ]]; then
    die "usage: worker.sh run JOB gs://.../logs/JOB -- COMMAND..."
  fi
  local job=$1 gs_dir=$2 pid
  shift 3
  worker_number
  mkdir -p "$LOG_DIR"
  # The lock is held by the detached job (and its command) for as long as it runs.
  exec 9>>"$LOG_DIR/$job.lock"
  if ! flock -n 9; then
    pid=$(cat "$LOG_DIR/$job.pid" 2>/dev/null || echo '?')
    say "$job is still running here (pid $pid): not starting another; log $LOG_DIR/$job.log"
    return 0
  fi
  gcloud storage rm "$gs_dir/worker-$WORKER_NUMBER.status" >/dev/null 2>&1 || true
  rm -f "$LOG_DIR/$job.status"
  nohup setsid bash "$0" _job "$job" "$gs_dir" "$WORKER_NUMBER" -- "$@" </dev/null >/dev/null 2>&1 &
  printf '%s\n' "$!" >"$LOG_DIR/$job.pid"
  exec 9>&-
  say "started $job (pid $!): log $LOG_DIR/$job.log, copied to $gs_dir/worker-$WORKER_NUMBER.log"
}

sync_log() {  # sync_log LOG DEST: copy LOG to DEST every LOG_SYNC_INTERVAL seconds until SIGTERM
  local sleeper=""
  exec 9>&-
  # SIGTERM ends the sleep at once, or lets a copy in progress finish first: none outlives this.
  trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
  while :; do
    sleep "$LOG_SYNC_INTERVAL" &
    sleeper=$!
    wait "$sleeper" || true
    gcloud storage cp "$1" "$2" >/dev/null 2>&1 || true
  done
}

cmd_job() {  # the detached job: _job JOB GS_DIR N -- COMMAND...
  local job=$1 gs_dir=$2 n=$3 rc=0 sync_pid try
  shift 4
  WORKER_NUMBER=$n
  local log="$LOG_DIR/$job.log" status="$LOG_DIR/$job.status"
  printf '%s\n' "$$" >"$LOG_DIR/$job.pid"
  # A SIGTERM (preemption, shutdown) reaches the command too; this shell waits for its status.
  trap 'printf "=== %s worker %s: SIGTERM\n" "$(date -u +%FT%TZ)" "$n" >>"$log"' TERM
  trap '' HUP
  printf '=== %s worker %s: %s\n' "$(date -u +%FT%TZ)" "$n" "$(printf '%q ' "$@")" >>"$log"
  sync_log "$log" "$gs_dir/worker-$n.log" &
  sync_pid=$!
  export PATH="$VENV/bin:$PATH"
  cd "$SRC_DIR" 2>/dev/null || cd "$HOME"
  "$@" >>"$log" 2>&1 || rc=$?
  kill "$sync_pid" 2>/dev/null || true
  wait "$sync_pid" 2>/dev/null || true
  printf '=== %s worker %s: exit status %s\n' "$(date -u +%FT%TZ)" "$n" "$rc" >>"$log"
  printf 'worker %s exit %s\n' "$n" "$rc" >"$status"
  gcloud storage cp "$log" "$gs_dir/worker-$n.log" >/dev/null 2>&1 || true
  for try in 1 2 3 4 5; do
    gcloud storage cp "$status" "$gs_dir/worker-$n.status" >/dev/null 2>&1 && break
    ((try == 5)) || sleep 10
  done
  rm -f "$LOG_DIR/$job.pid"
}

main() {
  case ${1:-} in
    setup) shift; cmd_setup "$@" ;;
    run) shift; cmd_run "$@" ;;
    _job) shift; cmd_job "$@" ;;
    *) die "usage: worker.sh setup|run ... (see the top of this file)" ;;
  esac
}

main "$@"; exit "$?"
