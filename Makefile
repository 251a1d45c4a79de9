# MoE Lab: `make book` builds the executed book, English into _build/html and Chinese into
# _build/html/zh (each chapter executed once); `make test` runs every test;
# `make check` is the contributors' fast loop (lint + unit and property tests, no npm, no browser).
# Each does its own set-up: a venv from requirements.txt with moe_lab installed in it; `make book`
# and `make test` also fetch the self-hosted page assets (MathJax, require.js, the widget manager)
# from npm, and `make test` installs headless Chromium for the browser test (with apt-get, as
# root: it says what to install when it cannot).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moe_lab-installed
export PYTHONPATH := $(CURDIR)
# Executed chapters must use the kernel's inline backend; a forced MPLBACKEND drops their figures.
unexport MPLBACKEND

.PHONY: setup assets browser book locale test check lint lab clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

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
	@command -v npm >/dev/null || { \
	  echo "make assets: npm is not installed. The book serves MathJax, require.js and the widget" >&2; \
	  echo "manager itself and fetches them with npm: install Node.js with npm (Debian/Ubuntu:" >&2; \
	  echo "sudo apt-get install npm; macOS: brew install node), then run make again." >&2; \
	  echo "(make check needs no npm.)" >&2; exit 1; }
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
# only when missing. apt-get needs root: as root it runs directly; otherwise through `sudo -n`,
# which fails at once instead of waiting at a password prompt, and then make says what to install.
BROWSER_PACKAGES := chromium fonts-wqy-microhei

browser:
	@if command -v chromium >/dev/null && fc-list :lang=zh 2>/dev/null | grep -q .; then exit 0; fi; \
	need="make browser: the browser test needs Debian's packages $(BROWSER_PACKAGES)"; \
	if ! command -v apt-get >/dev/null; then \
	  echo "$$need, and this system has no apt-get: install Chromium (as \`chromium\` on PATH)" \
	    "and a CJK font yourself, then run make again." >&2; exit 1; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else \
	  echo "$$need. Installing them needs root, and sudo is missing or asks for a password." >&2; \
	  echo "Run:  sudo apt-get install -y $(BROWSER_PACKAGES)   then run make again." >&2; \
	  exit 1; \
	fi; \
	echo "Installing $(BROWSER_PACKAGES) with apt-get$${SUDO:+ (sudo -n)}"; \
	$$SUDO apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null
	@command -v chromium >/dev/null || { echo "make browser: chromium is still not on PATH" >&2; exit 1; }

# Both editions from the same sources, with `-W --keep-going --all`: English into _build/html,
# executing every chapter once (MyST-NB's execution cache, emptied first), then Chinese from the
# catalogs under locale/ into _build/html/zh, taking each chapter's outputs from that cache.
book: setup assets
	$(PY) tools/book_editions.py build

# Update the Chinese catalogs from the English sources: the gettext builder, with no notebook
# executed, writes .pot files; babel merges them into locale/zh_CN/LC_MESSAGES/book/*.po (new
# messages added, changed ones fuzzy with the old translation kept, removed ones obsolete) and
# starts a catalog for a new page.
locale: setup
	$(PY) tools/locale_tools.py update

test: setup assets browser
	$(PY) -m pytest

# The fast loop: lint, then every unit and property test. Chapter execution and the browser test
# are marked `slow` and left out, so it needs neither npm nor Chromium. Two tests check the npm
# assets `make assets` fetched; they are left out while those are absent.
ASSET_TESTS := tests/test_book_extensions.py::test_offline_assets_present_in_this_checkout \
  tests/test_book_extensions.py::test_offline_assets_refuse_a_cdn_mathjax
CHECK_DESELECT = $(if $(wildcard $(ASSET_STAMP)),,$(addprefix --deselect ,$(ASSET_TESTS)))

check: lint
	$(PY) -m pytest -m "not slow" $(CHECK_DESELECT)

lint: setup
	$(VENV)/bin/ruff check moe_lab tests benchmarks tools book/_ext

# JupyterLab for `make lab`, pinned like everything else (jupytext, in requirements.txt, lets it
# open the chapters' .md files as notebooks).
JUPYTERLAB := jupyterlab==4.6.6

lab: setup
	$(PY) -m pip install --disable-pip-version-check -q $(JUPYTERLAB)
	$(VENV)/bin/jupyter lab book/

clean:
	rm -rf _build
