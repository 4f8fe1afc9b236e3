#!/usr/bin/env bash
# Start a command (an rrtf stage) on every worker (or one), detached from the ssh session:
# output in ~/rrtf-logs/JOB.log on each worker, copied to $BUCKET/logs/JOB/worker-N.log every
# minute and at the end, exit status in $BUCKET/logs/JOB/worker-N.status. While JOB still runs on
# a worker, running this again starts nothing there. Returns once the command is started.
#   launch/run.sh --config FILE [--dry-run] --job JOB [--worker all|N] -- rrtf STAGE ARGS...
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="--config FILE [--dry-run] --job JOB [--worker all|N] -- COMMAND..."

parse_args "$@"
job_args
load_config
require_slice
require_bucket
step_run
if ((!DRY_RUN)); then
  note "$JOB started; logs: gcloud storage cat '$BUCKET/logs/$JOB/worker-0.log'; exit statuses: gcloud storage cat '$BUCKET/logs/$JOB/worker-*.status'"
fi
