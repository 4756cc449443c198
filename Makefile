# The two commands of the README are `make demo` and `make test`; both install what they need.
# Installing is idempotent: the stamp is rebuilt only when requirements.txt or pyproject.toml change.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NATIVE := model_runtime/sandbox/native/_build/ndif_write_guard.so
# Tests and demos run on 2 cores next to Ray: keep torch and BLAS to one thread each.
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install tools generate verify lint test test-placement demo bench clean

install: $(STAMP) $(NATIVE)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pip, not uv: only pip sees the local CPU build of torch.
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	@touch $(STAMP)

# The sandbox's write guard as dispatcher kernels: C++ compiled against the installed torch (g++ and
# ninja); ninja recompiles only what changed. Without it, replicas fall back to the slower Python mode.
$(NATIVE): $(wildcard model_runtime/sandbox/native/*.cpp) $(wildcard model_runtime/sandbox/native/*.h) model_runtime/sandbox/native/build.py $(STAMP)
	$(BIN)/python -m model_runtime.sandbox.native.build
	@touch $@

# Tools that are not Python packages: promtool (tests/chart) comes from Debian's prometheus.
tools:
	@sh tools/install_promtool.sh

generate: install
	$(BIN)/ndif-operator generate
	$(BIN)/python tools/export_serve_schema.py

verify: install
	$(BIN)/ndif-operator generate --check
	$(BIN)/python tools/export_serve_schema.py --check

lint: install
	$(BIN)/ruff check ndif_operator model_runtime tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

test: install tools verify lint
	$(BIN)/pytest

# The real-Ray placement proof (two loopback nodes declaring 8 GPUs each; 5-15 minutes here).
test-placement: install
	NDIF_TEST_PLACEMENT_ON_RAY=1 PYTHONPATH=$(CURDIR) $(BIN)/pytest tests/placement

demo: install
	$(BIN)/python examples/demo.py

bench: install
	$(BIN)/python bench/planner.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo
