# Set-up and entry points. `make demo` and `make test` create or refresh .venv on their own.
PYTHON ?= python3
VENV   ?= .venv
TORCH_VERSION ?= 2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	# The pinned torch first: a CPU host resolves the local CPU wheel, a CUDA host the CUDA build.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[test,metaworld]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dit4dit demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
