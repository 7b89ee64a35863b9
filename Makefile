# Every target installs what it needs into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel of torch; override for another build, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
DEMO ?= demo
export PYTHONUNBUFFERED := 1

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Prepare the default synthetic cohort, check it, evaluate the shipped bundle model on every
# site's test patients, and train the bundle briefly (standalone, non-private) as a smoke run.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/dpseg synth --out $(DEMO)/data --sites 3 --seed 0
	$(BIN)/dpseg check-data $(DEMO)/data/site-1/datalist.json $(DEMO)/data/site-2/datalist.json $(DEMO)/data/site-3/datalist.json
	$(BIN)/dpseg evaluate $(DEMO)/data/site-1/datalist.json $(DEMO)/data/site-2/datalist.json $(DEMO)/data/site-3/datalist.json --json $(DEMO)/evaluate.json
	cd bundles/ct_liver_seg && ../../$(BIN)/python -m monai.bundle run --config_file configs/train.json \
	    --meta_file configs/metadata.json --logging_file configs/logging.conf \
	    --bundle_root ../../$(DEMO)/bundle_run --dataset_dir ../../$(DEMO)/data/site-1 --epochs 2 --val_interval 1

clean:
	rm -rf $(DEMO) .pytest_cache
