#!/usr/bin/env bash
# Prepare an NVFlare POC deployment of dpseg on this machine: a server and N sites (default 2),
# each a separate process talking gRPC over loopback.
#
#   NVFLARE_POC_WORKSPACE=/tmp/dpseg_poc DPSEG_DATA_ROOT=$PWD/data DPSEG_TOTAL_EPSILON=20 poc/prepare.sh 2
#
# NVFLARE_POC_WORKSPACE: where the POC startup kits go (replaced if present);
# DPSEG_DATA_ROOT: folder with <site>/datalist.json per site (e.g. from `dpseg synth`);
# DPSEG_TOTAL_EPSILON: each site's total epsilon budget; DPSEG_LEDGER (optional): ledger file,
# "{site}" replaced by the site's name (default: beside the site's datalist).
set -euo pipefail
N="${1:-2}"
: "${NVFLARE_POC_WORKSPACE:?set NVFLARE_POC_WORKSPACE to the folder for the POC startup kits}"
: "${DPSEG_DATA_ROOT:?set DPSEG_DATA_ROOT to the folder holding <site>/datalist.json}"
: "${DPSEG_TOTAL_EPSILON:?set DPSEG_TOTAL_EPSILON to the total epsilon budget of each site}"
nvflare poc prepare -n "$N" --force
KITS="$(dirname "$(ls -d "$NVFLARE_POC_WORKSPACE"/*/prod_00/server)")"
dpseg init-workspace "$KITS/server"
for kit in "$KITS"/site-*; do
  dpseg init-workspace "$kit" --data-root "$DPSEG_DATA_ROOT" --total-epsilon "$DPSEG_TOTAL_EPSILON" \
    ${DPSEG_LEDGER:+--ledger "$DPSEG_LEDGER"}
done
echo "POC kits ready under $KITS; next: poc/start.sh"
