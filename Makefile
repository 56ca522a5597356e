# The two commands a user needs: `make demo` and `make test`. Everything installs itself.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export RETENTION_HOME ?= $(CURDIR)/.retention
export AIRFLOW_HOME   ?= $(RETENTION_HOME)/airflow

.PHONY: install demo test bench airflow clean

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
	.ci/system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The enforcement against hand-written SQL at scale (README, Performance); not part of `make test`.
# `make bench SCALE=1` runs one scale; the default runs 1 and 4 and prints how they grew.
bench: install
	$(BIN)/python -m bench $(foreach s,$(SCALE),--scale $(s))

# The Airflow UI on http://localhost:8080 over the demo data (credentials printed at start).
airflow: install
	AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags AIRFLOW__CORE__PLUGINS_FOLDER=$(CURDIR)/plugins \
	AIRFLOW__CORE__LOAD_EXAMPLES=False $(BIN)/airflow standalone

clean:
	rm -rf $(VENV) .retention .pytest_cache
