#!/usr/bin/env bash
# Install the project with its tpu extra on every worker of the slice (--worker=all): the git
# ref REPO_URL@GIT_REF, or the local ARCHIVE uploaded to the bucket, into ~/rrtf-jax and the venv
# ~/rrtf-venv (launch/worker.sh setup). Running it again is harmless.
#   launch/setup.sh --config launch/configs/v5p-128-spot.env [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="--config FILE [--dry-run]"

parse_args "$@"
no_job_args
load_config
require_slice
require_bucket
require_source
step_setup
