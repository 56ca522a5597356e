# The two commands a user needs: `make demo` and `make test`. Everything installs itself.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export RETENTION_HOME ?= $(CURDIR)/.retention
export AIRFLOW_HOME   ?= $(RETENTION_HOME)/airflow

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m retention.demo.run_demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .retention .pytest_cache
