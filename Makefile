# MoE Lab: `make book` builds the executed book into _build/html; `make test` runs every test.
# Both do their own set-up: a venv from requirements.txt, moe_lab installed in it, and the
# self-hosted page assets (MathJax, require.js, the widget manager) fetched from npm; `make test`
# also installs headless Chromium for the browser test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moe_lab-installed
export PYTHONPATH := $(CURDIR)
# Executed chapters must use the kernel's inline backend; a forced MPLBACKEND drops their figures.
unexport MPLBACKEND

.PHONY: setup assets browser book test lint lab clean

# Page assets served from the built book, so math and widgets render with no internet.
# Only what the pages load is kept (about 11 MB of the 43 MB the packages unpack to):
# MathJax 3's TeX-to-CHTML bundle with its fonts, the TeX extensions it autoloads and the menu's
# accessibility parts; require.js; the widget manager's AMD bundle with its icon fonts.
ASSETS := book/_assets/vendor
ASSET_STAMP := $(ASSETS)/.fetched
NPM_PACKAGES := mathjax@3.2.2 requirejs@2.3.8 @jupyter-widgets/html-manager@1.0.15
MATHJAX_KEEP := LICENSE package.json es5/tex-chtml.js es5/input/tex/extensions \
  es5/output/chtml/fonts/woff-v2 es5/ui es5/a11y es5/sre
REQUIREJS_KEEP := package.json require.js
WIDGETS_KEEP := package.json dist/embed-amd.js dist/*.woff2 dist/*.woff

assets: $(ASSET_STAMP)

$(ASSET_STAMP): Makefile
	rm -rf $(ASSETS) && mkdir -p $(ASSETS)/npm
	cd $(ASSETS)/npm && npm pack --silent $(NPM_PACKAGES) >/dev/null
	for t in $(ASSETS)/npm/*.tgz; do \
	  name=$$(basename $$t .tgz | sed -E 's/-[0-9][0-9.]*$$//'); \
	  mkdir -p $(ASSETS)/npm/$$name && tar -xzf $$t -C $(ASSETS)/npm/$$name --strip-components=1; \
	done
	mkdir -p $(ASSETS)/mathjax && cd $(ASSETS)/npm/mathjax && cp -r --parents $(MATHJAX_KEEP) ../../mathjax/
	mkdir -p $(ASSETS)/requirejs && cd $(ASSETS)/npm/requirejs && cp $(REQUIREJS_KEEP) ../../requirejs/
	mkdir -p $(ASSETS)/html-manager && cd $(ASSETS)/npm/jupyter-widgets-html-manager && \
	  cp -r --parents $(WIDGETS_KEEP) ../../html-manager/
	rm -rf $(ASSETS)/npm
	touch $(ASSET_STAMP)

# Headless Chromium for tests/test_browser.py: Debian's package (Playwright's own browser download
# does not work here), and a small CJK font so the screenshots show the Chinese text. Installed
# only when missing, with sudo only when not already root.
browser:
	@if ! command -v chromium >/dev/null || ! fc-list :lang=zh 2>/dev/null | grep -q .; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null; \
	fi
	@command -v chromium >/dev/null

book: setup assets
	$(VENV)/bin/jupyter-book build . -W --keep-going

test: setup assets browser
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check moe_lab tests benchmarks

lab: setup
	$(PY) -m pip install -q jupyterlab
	$(VENV)/bin/jupyter lab book/

clean:
	rm -rf _build
