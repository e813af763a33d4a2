# Two entry points: `make lab` opens the walkthrough, `make test` runs every test
# (`make test-walkthrough`: only the five core notebooks).
# Both create (or reuse) a virtual environment in .venv with the package installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# Where notebooks and tests find the ants-vs-bees data (the folder holding hymenoptera_data/):
# $DRIFTTUTOR_DATA if set, else a shared copy beside the clone if there is one, else ./data
# (downloaded there on first use).
DRIFTTUTOR_DATA ?= $(if $(wildcard ../shared/data/hymenoptera_data),$(abspath ../shared/data),$(CURDIR)/data)
# absolute, because notebook kernels run in notebooks/, not here
override DRIFTTUTOR_DATA := $(abspath $(DRIFTTUTOR_DATA))
export DRIFTTUTOR_DATA

.PHONY: lab test test-walkthrough install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

lab: install
	$(BIN)/jupyter lab notebooks/

test: install
	$(BIN)/python -m pytest

# only the five core notebooks (load data -> finetune -> blur -> detect -> Isomap), timed
test-walkthrough: install
	$(BIN)/python -m pytest --durations=5 notebooks/0[1-5]_*.ipynb

clean:
	rm -rf $(VENV) notebooks/.drifttutor-cache
