# MoE Lab: `make book` builds the executed book into _build/html; `make test` runs every test.
# Both do their own set-up: a venv from requirements.txt, moe_lab installed in it, and the
# self-hosted page assets (MathJax, require.js, the widget manager) fetched from npm.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moe_lab-installed
export PYTHONPATH := $(CURDIR)
# Executed chapters must use the kernel's inline backend; a forced MPLBACKEND drops their figures.
unexport MPLBACKEND

.PHONY: setup assets book test lint lab clean

# Page assets served from the built book, so math and widgets render with no internet.
ASSETS := book/_assets/vendor
ASSET_STAMP := $(ASSETS)/.fetched
NPM_PACKAGES := mathjax@3.2.2 requirejs@2.3.8 @jupyter-widgets/html-manager@1.0.15

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

assets: $(ASSET_STAMP)

$(ASSET_STAMP): Makefile
	rm -rf $(ASSETS) && mkdir -p $(ASSETS)/tgz
	cd $(ASSETS)/tgz && npm pack --silent $(NPM_PACKAGES) >/dev/null
	for t in $(ASSETS)/tgz/*.tgz; do \
	  name=$$(basename $$t .tgz | sed -E 's/-[0-9][0-9.]*$$//'); \
	  mkdir -p $(ASSETS)/$$name && tar -xzf $$t -C $(ASSETS)/$$name --strip-components=1; \
	done
	rm -rf $(ASSETS)/tgz
	touch $(ASSET_STAMP)

book: setup assets
	$(VENV)/bin/jupyter-book build . -W --keep-going

test: setup assets
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check moe_lab tests benchmarks

lab: setup
	$(PY) -m pip install -q jupyterlab
	$(VENV)/bin/jupyter lab book/

clean:
	rm -rf _build
