# `make test`: the one test command (README, CI). It builds .venv itself on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test quicktest demo install

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'

test: install
	$(PY) -m pytest -q -m 'slow or not slow'

quicktest:
	$(PY) -m pytest -q

demo: install
	$(PY) -m echo demo
