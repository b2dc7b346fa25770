# `make test` and `make demo` work on a fresh machine: they create .venv and install the locked dependency tree first.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
OFFLINE_ENV := HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

.PHONY: install lock test demo browser clean

install: $(STAMP)

# Every package of the lock at its version and file hash (pip refuses any other file), then the project itself;
# both without dependency resolution, so nothing outside the lock comes in. `pip check` fails when the lock misses
# a dependency or pyproject.toml and the lock disagree (regenerate with `make lock`).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(VENV)/bin/python -m pip check
	touch $(STAMP)

# Resolves winnow[test] from scratch (nothing installed is reused) and writes every package with its sha256.
lock:
	$(PYTHON) -m pip install --quiet --dry-run --ignore-installed --report .lock-report.json ".[test]"
	$(PYTHON) .ci/lock.py .lock-report.json > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -f .lock-report.json

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
