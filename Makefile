# `make test` and `make demo` work on a fresh machine: they create .venv and install the pinned project first.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-stamp
OFFLINE_ENV := HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

.PHONY: install test demo browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(OFFLINE_ENV) $(VENV)/bin/python -m pytest -q

demo: $(STAMP)
	$(OFFLINE_ENV) $(VENV)/bin/winnow demo --out demo_data

# Debian's chromium for the report's headless-browser test; best effort: without it that one test skips.
browser:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) \
		|| echo "chromium could not be installed; the report browser test will skip"

clean:
	rm -rf demo_data .pytest_cache
