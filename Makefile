# attnlab: `make run` sets everything up and runs the main job on the bundled models; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
LOCK   := requirements.lock
STAMP  := $(VENV)/.installed-$(shell cat $(LOCK) pyproject.toml | cksum | cut -d' ' -f1)
RUNS   := runs
# uv, pinned to the version the lock holds, installs everything else from the lock.
UV_VERSION := $(shell sed -n 's/^uv==//p' $(LOCK))
# Where the CPU build of torch comes from: a local folder of wheels where the machine has one, else PyTorch's CPU index.
TORCH_WHEELS ?= $(firstword $(wildcard /opt/wheels))
TORCH_SOURCE ?= $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
# The lock is resolved for the machines CI and `make run` use: CPython 3.11 on Linux x86-64.
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28
EXTRAS := --extra test --extra dit --extra dev --extra ray

.PHONY: setup lock test-latest lint browser run test docs notebooks clean

setup: $(STAMP)

# Exactly the lock, nothing else: `uv pip sync --strict` installs the pinned set (removing anything not in it) and fails
# if a pinned package needs one the lock lacks; attnlab itself goes in editable, without dependencies or a build env.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) && $(UV) --version | grep -q " $(UV_VERSION)" || $(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(UV) pip sync -q --python $(BIN)/python --strict $(TORCH_SOURCE) $(LOCK)
	$(UV) pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# Re-resolve the lock from pyproject.toml's ranges (newest versions they allow) and the CPU torch pin.
lock: setup
	$(UV) pip compile -q pyproject.toml requirements-torch.in $(EXTRAS) $(LOCK_TARGET) $(TORCH_SOURCE) -o $(LOCK)

# Drift check: a throwaway environment with the newest versions pyproject.toml's ranges allow (torch held at the
# locked CPU build: a newer torch on PyPI is a CUDA build of several GB), then lint and the whole suite.
test-latest: setup browser
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	$(UV) pip install -q --python .venv-latest/bin/python --resolution highest --upgrade $(TORCH_SOURCE) \
	  -r requirements-torch.in -e ".[test,dit,dev,ray]"
	.venv-latest/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|transformer.lens|dash|plotly|numpy|pandas)==' || true
	.venv-latest/bin/ruff check . && .venv-latest/bin/ruff format --check .
	.venv-latest/bin/python -m pytest
	.venv-latest/bin/python -m pytest --nbmake examples -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Each run directory is made afresh (`attnlab scan` refuses to add to an existing run without --append).
RUN_DIRS := minilm-prose organism-lm-prose organism-lm-niah organism-lm-arithmetic organism-vlm-shapes organism-sink-bb
run: setup
	$(BIN)/attnlab models
	rm -rf $(addprefix $(RUNS)/,$(RUN_DIRS))
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
	@if $(BIN)/python -c "from attnlab.models import bundled_path; import sys; sys.exit(bundled_path('organism-sink') is None)"; then \
	  $(BIN)/attnlab scan --model organism-sink --probes sinks,extremes --dataset bigram-backcopy --n-prompts 16 --out $(RUNS)/organism-sink-bb --quiet \
	    --param massive_activations.ratio_threshold=10 && \
	  $(BIN)/attnlab eval organism-sink --task backcopy; \
	else echo "organism-sink is not bundled in this checkout; skipped"; fi
	@echo "done: runs are in $(RUNS)/ (open any figures/*.html in a browser; 'attnlab show $(RUNS)/minilm-prose' prints a run)"
	@echo "open the app: $(BIN)/attnlab app --runs $(RUNS)   (then browse http://127.0.0.1:8050/)"

# Debian's chromium + chromedriver for the app's real-browser test (skipped, not failed, where they cannot be had).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "chromium not installed: the app's browser test will be skipped"

# The API reference from the docstrings (pdoc): build/api/index.html. tests/test_api_docs.py builds it in `make test`.
docs: setup
	$(BIN)/python scripts/api_docs.py build/api

# The example notebooks, executed top to bottom on CPU (nbmake); they are committed without outputs.
notebooks: setup
	$(BIN)/python -m pytest --nbmake examples -p no:cacheprovider

test: setup browser lint
	$(BIN)/python -m pytest
	$(BIN)/python -m pytest --nbmake examples -p no:cacheprovider

clean:
	rm -rf $(RUNS) .pytest_cache .venv-latest build/api
