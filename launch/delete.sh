#!/usr/bin/env bash
# Delete the config's queued resource and its TPU node (--force); nothing to do if it is gone.
#   launch/delete.sh --config launch/configs/v5p-128-spot.env [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="--config FILE [--dry-run]"

parse_args "$@"
no_job_args
load_config
require_slice
qr_delete
