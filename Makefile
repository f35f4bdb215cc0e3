# attnlab: `make run` sets everything up and runs the main job on the bundled models; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUNS   := runs

.PHONY: setup browser run test clean

setup: $(STAMP)

# The CPU build of torch goes in first where no torch is present: a plain `torch` requirement would pull a
# multi-GB CUDA build. Then the package with its test and diffusers extras installs beside it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,dit]"
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	$(BIN)/attnlab models
	$(BIN)/attnlab scan --model minilm --probes sinks,induction --dataset prose --n-prompts 16 --out $(RUNS)/minilm-prose --quiet
	@if $(BIN)/python -c "from attnlab.models import bundled_path; import sys; sys.exit(bundled_path('organism-lm') is None)"; then \
	  $(BIN)/attnlab scan --model organism-lm --probes sinks,induction --dataset prose --n-prompts 16 --out $(RUNS)/organism-lm-prose --quiet && \
	  $(BIN)/attnlab scan --model organism-lm --probes retrieval,streaming --dataset niah --n-prompts 8 --out $(RUNS)/organism-lm-niah --quiet && \
	  $(BIN)/attnlab ablate --model organism-lm --heads $(RUNS)/organism-lm-niah:retrieval_heads --k 4 --metric niah --out $(RUNS)/organism-lm-niah/causal && \
	  $(BIN)/attnlab eval organism-lm --task niah && \
	  $(BIN)/attnlab scan --model organism-lm --probes preplan_anchor --dataset arithmetic --n-prompts 8 --out $(RUNS)/organism-lm-arithmetic --quiet; \
	else echo "organism-lm is not bundled in this checkout; skipped"; fi
	@if $(BIN)/python -c "from attnlab.models import bundled_path; import sys; sys.exit(bundled_path('organism-vlm') is None)"; then \
	  $(BIN)/attnlab scan --model organism-vlm --probes vision --dataset shapes --n-prompts 8 --out $(RUNS)/organism-vlm-shapes --quiet; \
	else echo "organism-vlm is not bundled in this checkout; skipped"; fi
	@echo "done: runs are in $(RUNS)/ (open any figures/*.html in a browser; 'attnlab show $(RUNS)/minilm-prose' prints a run)"
	@echo "open the app: $(BIN)/attnlab app --runs $(RUNS)   (then browse http://127.0.0.1:8050/)"

# Debian's chromium + chromedriver for the app's real-browser test (skipped, not failed, where they cannot be had).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "chromium not installed: the app's browser test will be skipped"

test: setup browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(RUNS) .pytest_cache
