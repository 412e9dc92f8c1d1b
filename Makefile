# loan-archive developer entry points. Everything a fresh Debian machine needs is
# installed by `make install`; `make test` is what CI runs (via .ci/run).

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Debian packages the project needs (server binaries, OCR engine and languages, fonts).
SYSTEM_PACKAGES := postgresql-15 fonts-dejavu-core tesseract-ocr tesseract-ocr-spa tesseract-ocr-eng
# Debian's python3 needs python3-venv for `python3 -m venv`; other builds ship it.
ifneq ($(shell $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null && echo ok),ok)
SYSTEM_PACKAGES += python3-venv
endif

.PHONY: install system-packages run test lint bench clean

install: system-packages $(STAMP)

system-packages:
	@scripts/system-packages $(SYSTEM_PACKAGES)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install -e '.[dev]'
	touch $@

run: install
	$(VENV)/bin/loan-archive serve --with-worker

test: install
	$(VENV)/bin/ruff check .
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	@set -e; for script in bench/*.py; do \
		[ -e "$$script" ] || continue; \
		echo "== $$script"; \
		$(VENV_PY) "$$script"; \
	done

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis *.egg-info
