# ddr — `make demo` and `make test` each install what is missing first (`make setup`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel (taken from local disk on our dev/CI machines). On a CUDA host, e.g.:
#   make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
PYTEST_ARGS ?=

.PHONY: setup test demo lint validate dev inspect browser-deps dagster-home lab-setup lab-home train-toy train-toy-rich train-toy-seed1 train-toy-no-yellow diff-toy clean-data

setup: $(VENV)/.ddr-installed

$(VENV)/.ddr-installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,lab]"
	@if $(PY) -c "import torchvision" 2>/dev/null; then \
	  echo "torchvision is installed in $(VENV) and breaks transformers beside this torch: removing it"; \
	  $(PY) -m pip uninstall -y -q torchvision; fi
	@touch $@

# Debian's Chromium + ChromeDriver for the real-browser tests (nothing downloads a browser of its own).
# Installed when missing and apt-get is usable (root); otherwise those tests skip with a loud reason.
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian chromium + chromium-driver for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "WARNING: could not install chromium; browser tests will skip"; \
	else echo "NOTE: chromium/chromedriver not installed and not root: browser tests will skip"; fi

test: setup browser-deps
	@mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/ruff check ddr_core ddr_resources ddr_assets dagster_project tests benchmarks examples
	$(PY) -m pytest -q $(PYTEST_ARGS)

# A lab's shared instance (docs/DEPLOYMENT.md): PostgreSQL storage, the daemon's settings. Needs the [lab] extra
# (installed by `make setup`) and DDR_PG_* in the environment; DAGSTER_HOME on the lab server's shared disk.
lab-setup: setup

lab-home:
	@mkdir -p $(DAGSTER_HOME)
	@test -f $(DAGSTER_HOME)/dagster.yaml || cp deploy/lab/dagster.yaml $(DAGSTER_HOME)/dagster.yaml

# A persistent Dagster instance with the project's settings (run queue, GPU concurrency pool).
dagster-home:
	@mkdir -p $(DAGSTER_HOME)
	@test -f $(DAGSTER_HOME)/dagster.yaml || cp dagster_project/dagster.yaml $(DAGSTER_HOME)/dagster.yaml

demo: setup dagster-home
	$(PY) -m dagster_project.demo

lint: setup
	$(VENV)/bin/ruff check ddr_core ddr_resources ddr_assets dagster_project tests benchmarks examples

validate: setup
	@mkdir -p $(DAGSTER_HOME)
	$(VENV)/bin/dagster definitions validate -w workspace.yaml

# The Dagster UI (loopback only, behind the web guard; see README for remote access) and the dagster-daemon.
# Open the printed http://127.0.0.1:3000/?token=... once. Another port: make dev DEV_PORT=3001. DEV_ARGS: e.g.
# "--read-only", "--no-token" (single-user machine), "--allow-host localhost:8080" (SSH tunnel on another
# local port). A bare `dagster dev` is NOT guarded.
DEV_PORT ?= 3000
DEV_ARGS ?=
dev: setup dagster-home
	$(PY) -m dagster_project.launcher dev --host 127.0.0.1 --port $(DEV_PORT) -w workspace.yaml $(DEV_ARGS)

# The inspector (Streamlit, loopback only, behind the same guard) on the demo's data root; open the printed URL.
# Another port: make inspect INSPECT_PORT=8502; INSPECT_ARGS as DEV_ARGS.
INSPECT_PORT ?= 8501
INSPECT_ARGS ?=
inspect: setup
	$(PY) -m dagster_project.launcher inspector --host 127.0.0.1 --port $(INSPECT_PORT) \
	  --data-root $${DDR_DATA_ROOT:-data} $(INSPECT_ARGS)

# Toy world: retrain the shipped model (models/toy-world) from scratch: seeded, one thread (bitwise the shipped
# weights on the machine that made them; one thread also slows least when other jobs share the CPU), 22-26 min
# on this 2-core machine. Writes the pipeline, concept_classifier/, toy_samples.png and toy_training_report.json
# (compare with models/toy-world/toy_training_report.json). TOY_OUT=models/toy-world refreshes the shipped model.
TOY_OUT ?= data/toy-world
train-toy: setup
	$(PY) -m ddr_core.toy_training --out $(TOY_OUT) --threads 1 --compare-with models/toy-world

# The richer world (docs/TOY_WORLD.md: 576 prompts, 19 values; the design fixed by a power simulation) into its
# own folder: the shipped models/toy-world stays what the demo uses. Same model and seeds; 5000 UNet steps (the
# second attempt, docs/TOY_WORLD.md: 2500 drew squares and diamonds as blobs; TOY_RICH_UNET_STEPS=2500 redoes the
# first); ~35 min on one idle thread.
TOY_RICH_OUT ?= data/toy-world-rich
TOY_RICH_UNET_STEPS ?= 5000
train-toy-rich: setup
	$(PY) -m ddr_core.toy_training --out $(TOY_RICH_OUT) --threads 1 --world shapes-rich --eval-images-per-prompt 1 \
	  --unet-steps $(TOY_RICH_UNET_STEPS)

# The toy world with one concept removed (no yellow shapes; the word stays in the vocabulary): the second model
# the feature-matching diff compares with models/toy-world (docs/MATCHING.md). Same model, steps and seed; ~25 min
# idle on one thread. The shipped copy is models/toy-world-no-yellow (TOY_NO_YELLOW_OUT=models/toy-world-no-yellow).
TOY_NO_YELLOW_OUT ?= data/toy-world-no-yellow
train-toy-no-yellow: setup
	$(PY) -m ddr_core.toy_training --out $(TOY_NO_YELLOW_OUT) --threads 1 --world shapes-no-yellow

# The control of the diff (docs/MATCHING.md): the toy model retrained on the FULL world with seed 1 (shipped as
# models/toy-world-seed1; TOY_SEED1_OUT=models/toy-world-seed1 refreshes it). ~20-25 min idle on one thread.
TOY_SEED1_OUT ?= data/toy-world-seed1
train-toy-seed1: setup
	$(PY) -m ddr_core.toy_training --out $(TOY_SEED1_OUT) --threads 1 --seed 1

# The two-model diff (docs/MATCHING.md): capture models/toy-world-no-yellow on the toy world's prompts and seeds
# exactly as the demo captures toy-world, and match it with toy-raw (feature_matches[toy-raw__toy-noyellow-raw]).
# About a minute after `make demo` (its toy-world capture is reused); same DDR_DATA_ROOT / DAGSTER_HOME.
diff-toy: setup dagster-home
	DDR_PROFILE=toy-diff $(PY) -m dagster_project.demo --comparison toy-raw__toy-noyellow-raw

clean-data:
	rm -rf data .dagster_home
