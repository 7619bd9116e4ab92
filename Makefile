# The two commands: `make train` (the main job) and `make test` (the whole suite).
# Both create the virtual environment on first use (torch/torchvision pinned by
# constraints.txt: those wheels are on this machine's disk) and reuse it after.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: train test test-fast bench chromium experiment

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 \
		| grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch, diffusers, accelerate, omegaconf" || (echo "environment set-up failed" && exit 1)
	@touch $(STAMP)

# Main job: the embedded default (synthetic data, tiny model, CPU, ~5 minutes).
# The flags only state accelerate's defaults (it warns when they are missing); train.py picks
# the CPU thread count itself (train.cpu_threads).
train: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no train.py $(ARGS)

# Headless Chromium renders the HTML report in the browser test (Debian's package). The test
# looks for these names on PATH; when none is there after the install, this target fails.
CHROMIUM_NAMES ?= chromium chromium-browser google-chrome
FIND_CHROMIUM  := for b in $(CHROMIUM_NAMES); do command -v $$b >/dev/null && exit 0; done; exit 1
chromium:
	@sh -c '$(FIND_CHROMIUM)' || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@sh -c '$(FIND_CHROMIUM)' || (echo "Chromium install failed: none of '$(CHROMIUM_NAMES)' is on PATH" \
		"(the browser test needs one: apt-get update && apt-get install -y chromium)" >&2; exit 1)

# Whole suite, slow end-to-end tests included.
test: $(STAMP) chromium
	$(PY) -m pytest -q $(ARGS)

# Without the slow end-to-end tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) bench/monitor.py
	$(PY) bench/step.py
	$(PY) bench/warp.py

# The stability-loss experiment: baseline vs four regularised arms (the variance, the I²AM authors' recipe,
# the anchored terms, Leffa's flow loss), each on seeds 0, 1, 2, same data and steps -> a markdown table.
# The anchored arm runs on the model with 16 null tokens (baseline_null is its control); anchored_warp
# is the default run, that model with the attention warp (warp is its control).
experiment: $(STAMP)
	$(PY) -m apps.experiment configs/experiments/baseline.yaml configs/experiments/refined.yaml \
		configs/experiments/authors.yaml configs/experiments/baseline_null.yaml \
		configs/experiments/anchored.yaml configs/experiments/flow.yaml \
		configs/experiments/warp.yaml configs/experiments/anchored_warp.yaml \
		--seeds 0,1,2 $(ARGS)
