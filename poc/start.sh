#!/usr/bin/env bash
# Start the POC server and sites prepared by poc/prepare.sh (returns once they are up);
# extra arguments go to `nvflare poc start`, e.g. `-p site-3` to (re)start one site.
set -euo pipefail
: "${NVFLARE_POC_WORKSPACE:?set NVFLARE_POC_WORKSPACE as for poc/prepare.sh}"
nvflare poc start --timeout "${POC_START_TIMEOUT:-120}" "$@"
