#!/usr/bin/env bash
# Create the config's queued resource (one TPU slice: spot, reserved or on-demand) and wait until
# it is ACTIVE. An existing queued resource is not created again (it is waited for instead).
#   launch/create.sh --config launch/configs/v5p-128-spot.env [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
USAGE="--config FILE [--dry-run]"

parse_args "$@"
no_job_args
load_config
require_slice
require_create
qr_create
