# Every target installs what it needs into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch; override for another build, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
DEMO ?= demo
export PYTHONUNBUFFERED := 1
SHELL := /bin/bash

.PHONY: install test demo demo-baseline bench privacy-audit privacy-audit-fl study study-quick monailabel-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Two pytest workers: the whole runs spend much of their time starting processes and waiting on
# NVFlare, so two at once fill the two cores; TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The README's main command: the default synthetic cohort (3 sites), checked, then the federated
# DP job in the NVFlare simulator (3 sites, 3 processes) on a new workspace, as the README types it,
# then the privacy / utility report. Site settings come from the environment, as a site's own would
# (see docs/deployment.md, "Site settings"). Each site's privacy ledger holds its total budget (SITE_BUDGET):
# created with `dpseg ledger init` where missing, before the simulator (`make demo` starts from
# nothing, ledgers included). SIM_PROGRESS keeps the simulator's progress lines: the server's start,
# each site's data check and caching (the first minute), the calibration, every round, the test Dice.
SITE_ENV = DPSEG_DATA_ROOT=$(abspath $(DEMO))/data DPSEG_LEDGER=$(abspath $(DEMO))/ledgers/{site}.json
SITE_BUDGET ?= 20
DEMO_SITES = site-1 site-2 site-3
LEDGERS_INIT = for site in $(DEMO_SITES); do test -f $(DEMO)/ledgers/$$site.json || \
	$(BIN)/dpseg ledger init $(DEMO)/ledgers/$$site.json --total-epsilon $(SITE_BUDGET) || exit 1; done
SIM_PROGRESS = grep --line-buffered -E \
	"job started|checking its data|data checked|data ready|calibrat|round [0-9]+:|test Dice|ERROR|Traceback"

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/dpseg synth --out $(DEMO)/data --sites 3 --seed 0
	$(BIN)/dpseg check-data $(DEMO)/data/site-1/datalist.json $(DEMO)/data/site-2/datalist.json $(DEMO)/data/site-3/datalist.json
	$(LEDGERS_INIT)
	set -o pipefail; $(SITE_ENV) $(BIN)/nvflare simulator jobs/fed_dp -w $(DEMO)/ws -n 3 -t 3 2>&1 \
	    | tee $(DEMO)/simulator.log | $(SIM_PROGRESS)
	$(BIN)/dpseg report $(DEMO)/ws

# The same federation without DP (the baseline), on the data `make demo` prepared.
demo-baseline: $(STAMP)
	test -f $(DEMO)/data/site-1/datalist.json || $(BIN)/dpseg synth --out $(DEMO)/data --sites 3 --seed 0
	rm -rf $(DEMO)/ws_fed
	$(LEDGERS_INIT)
	set -o pipefail; $(SITE_ENV) $(BIN)/nvflare simulator jobs/fed -w $(DEMO)/ws_fed -n 3 -t 3 2>&1 \
	    | tee $(DEMO)/simulator_fed.log | $(SIM_PROGRESS)
	$(BIN)/dpseg report $(DEMO)/ws_fed

# DP vs non-DP step time of the bundle network (medians, same process) and each mode's peak memory,
# attack time, simulator overhead and scaling (1, 2, 4, 8 sites) -> bench.json (about 10 min)
bench: $(STAMP)
	$(BIN)/python -m dpseg.tools.bench --attack --fl --demo --json bench.json

# The empirical epsilon of jobs/fed_dp: canaries through the site's DP step, the shipped mechanism
# and five broken ones (docs/audit.md, "Empirical epsilon") -> privacy_audit/; EPSILON=3 for another claim
PRIVACY_AUDIT ?= privacy_audit
privacy-audit: $(STAMP)
	$(BIN)/dpseg privacy-audit --out $(PRIVACY_AUDIT) $(if $(EPSILON),--epsilon $(EPSILON))

# The one-run audit inside the real job: an audit copy of jobs/fed_dp with 1,000 canaries per site in
# the simulator (about a demo's time) -> privacy_audit/privacy_audit_fl.{json,md}
privacy-audit-fl: $(STAMP)
	$(BIN)/dpseg privacy-audit --fl --out $(PRIVACY_AUDIT)

# The privacy-utility study (local, pooled, FL, FL+DP at epsilon 8, 3, 1, and the audit at each):
# docs/results.md and docs/figures/. The full grid takes hours on a 2-core CPU; study-quick ~22 min.
study: $(STAMP)
	$(BIN)/dpseg study --grid full --out docs

study-quick: $(STAMP)
	$(BIN)/dpseg study --grid quick --out docs

# MONAI Label 0.8.5 in its own environment (its own torch), built once into a cache folder that
# later runs (and fresh clones on the same machine) reuse. Pins: newer fastapi / starlette and
# monai 1.5+ break MONAI Label 0.8.5's endpoints and its inference transforms; pydicom 3 breaks
# its import.
MONAILABEL_VENV ?= $(HOME)/.cache/dpseg/monailabel-0.8.5
MONAILABEL_PINS = monailabel==0.8.5 torch==2.14.1 torchvision==0.29.1 monai==1.4.0 fastapi==0.115.12 \
	pydicom==2.4.4 dicomweb-client==0.59.1 pynetdicom==2.0.2
MLCHECK ?= monailabel_check
MLCHECK_PORT ?= 8765

$(MONAILABEL_VENV)/.installed:
	$(PYTHON) -m venv $(MONAILABEL_VENV)
	$(MONAILABEL_VENV)/bin/python -m pip install -q --upgrade pip
	$(MONAILABEL_VENV)/bin/python -m pip install -q $(MONAILABEL_PINS)
	touch $@

# The bundle in the real MONAI Label server over HTTP: /info, /infer (shape, affine, Dice), /train.
monailabel-check: $(STAMP) $(MONAILABEL_VENV)/.installed
	rm -rf $(MLCHECK)
	$(BIN)/dpseg synth --out $(MLCHECK)/data --sites 1 --patients 15 --seed 3
	$(BIN)/dpseg monailabel-check --venv $(MONAILABEL_VENV) --datalist $(MLCHECK)/data/site-1/datalist.json \
	    --work $(MLCHECK)/work --port $(MLCHECK_PORT)

clean:
	rm -rf $(DEMO) $(MLCHECK) .pytest_cache
