#!/usr/bin/env bash
# Prepare an NVFlare POC deployment of dpseg on this machine: a server and N sites (default 2),
# each a separate process talking gRPC over loopback.
#
#   NVFLARE_POC_WORKSPACE=/tmp/dpseg_poc DPSEG_DATA_ROOT=$PWD/data DPSEG_LEDGER=$PWD/ledgers/{site}.json \
#     poc/prepare.sh 2
#
# NVFLARE_POC_WORKSPACE: where the POC startup kits go (replaced if present);
# DPSEG_DATA_ROOT: folder with <site>/datalist.json per site (e.g. from `dpseg synth`);
# DPSEG_LEDGER: each site's privacy ledger, "{site}" replaced by the site's name; a missing one is
# created with the total budget POC_TOTAL_EPSILON (default 20; `dpseg ledger init`), an existing
# one is kept as it is.
set -euo pipefail
N="${1:-2}"
: "${NVFLARE_POC_WORKSPACE:?set NVFLARE_POC_WORKSPACE to the folder for the POC startup kits}"
: "${DPSEG_DATA_ROOT:?set DPSEG_DATA_ROOT to the folder holding <site>/datalist.json}"
if [ -z "${DPSEG_LEDGER:-}" ]; then
  echo "DPSEG_LEDGER: set it to the privacy ledger file of each site ({site} is replaced by the site name)" >&2
  exit 1
fi
nvflare poc prepare -n "$N" --force
KITS="$(dirname "$(ls -d "$NVFLARE_POC_WORKSPACE"/*/prod_00/server)")"
dpseg init-workspace "$KITS/server"
for kit in "$KITS"/site-*; do
  site="$(basename "$kit")"
  ledger="${DPSEG_LEDGER//\{site\}/$site}"
  [ -f "$ledger" ] || dpseg ledger init "$ledger" --total-epsilon "${POC_TOTAL_EPSILON:-20}"
  dpseg init-workspace "$kit" --data-root "$DPSEG_DATA_ROOT" --ledger "$DPSEG_LEDGER"
done
echo "POC kits ready under $KITS; next: poc/start.sh"
