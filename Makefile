# `make test`: the one test command (README, CI). It builds .venv itself on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test quicktest demo install

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch and the build tools first, then echo without build isolation: setup.py compiles the optional
# extension echo._C (csrc/) against this CPU torch, and an isolated build never pulls a CUDA torch.
install: $(PY)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 numpy "setuptools>=77" wheel ninja
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[dev]'

test: install
	$(PY) csrc/build.py check-cuda
	$(PY) -m pytest -q -m 'slow or not slow'

quicktest: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m echo demo
