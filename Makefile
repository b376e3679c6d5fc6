# Two commands for a fresh clone:  make demo  |  make test
# Both create .venv with python3 if it is missing. torch is pinned to the CPU build (train extra).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# runtime only: ONNX Runtime, OpenCV, ZeroMQ, SQLAlchemy (no torch)
$(VENV)/.runtime: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# runtime + dev (pytest, ruff, import-linter, psycopg) + train (torch==2.13.0 CPU, onnx)
$(VENV)/.dev: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[dev,train,postgres]"
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(VENV)/bin/crackscan demo

# two pytest-xdist workers: much of the suite waits on processes, sockets and timeouts;
# a test file runs whole on one worker, so its module fixtures are built once
TEST_JOBS ?= 2

test: $(VENV)/.dev
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf crackscan-demo .pytest_cache
