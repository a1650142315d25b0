# Two entry points: `make run` (the whole pipeline on the embedded default) and
# `make test` (`make test-unit`: only tests/unit/, the in-process checks). Both create .venv
# and install into it when needed: the `hf` extra (`gptflow export`) and the `test` extra.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-unit install postgresql chromium bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[hf,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gptflow run configs/tiny.yaml

# tests/integration/test_infra_postgres.py runs PostgreSQL: Debian's package, installed when missing.
postgresql:
	@command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

# tests/integration/test_servers.py checks both UIs in headless Chromium: Debian's package, installed when missing.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: $(STAMP) postgresql chromium
	$(BIN)/pytest --timeout=900 --durations=25 tests

test-unit: $(STAMP)
	$(BIN)/pytest --timeout=900 --durations=25 tests/unit

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf workspace mlruns mlflow.db
