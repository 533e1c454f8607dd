# e2ediff — setup, tests, the demo.   `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup data test demo demo-from-scratch clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # the CPU wheel first, so nothing pulls a CUDA build
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

data:
	bash scripts/get_fashion_mnist.sh

setup: $(STAMP) data

test: setup
	$(VENV)/bin/pytest tests

demo: setup
	$(VENV)/bin/e2ediff demo

demo-from-scratch: setup
	$(VENV)/bin/e2ediff demo --from-scratch

clean:
	rm -rf $(VENV) runs
