#!/usr/bin/env bash
# Stop the POC server and sites.
set -euo pipefail
: "${NVFLARE_POC_WORKSPACE:?set NVFLARE_POC_WORKSPACE as for poc/prepare.sh}"
nvflare poc stop
