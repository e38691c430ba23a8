# Two commands do all the set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist): one per core of a CI machine; `make test PYTEST_WORKERS=0`
# runs in this process.
PYTEST_WORKERS ?= 2
PYTEST := TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: test test-slow demo docs lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test,plot,examples]"
	touch $(STAMP)

test: $(STAMP)
	$(PYTEST) tests

# The long cross-checks the default run leaves out (marked `slow`); CI runs them too.
test-slow: $(STAMP)
	$(PYTEST) -m slow tests

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/laplace-tf demo --out demo_output

docs: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check laplace_tf tests examples benchmarks
	$(BIN)/ruff format --check laplace_tf tests examples benchmarks

bench: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/hessian_diagonal.py
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python benchmarks/curvature.py

clean:
	rm -rf $(VENV) build *.egg-info
