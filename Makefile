# Two commands matter to a newcomer: `make demo` and `make test`. Each builds .venv first.
# .venv has the [dev] extra: test and lint tools, and the [emulator] and [redis] extras.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready

.PHONY: demo test coverage tools lint check check-runtime bench-emulator bench-engine bench-daemon bench-soak bench-delivery clean

$(READY): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is needed (python3.11 or python3)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$(PYTHON) is older than 3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# The emulator's client secret (README's quick try, config/quick.toml, config/emulator.toml):
# made at random once, in the emulator's default data folder, where `aep-exporter emulator`
# reads it. Nothing in the repository holds one.
.aep-emulator/client-secret:
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is needed (python3.11 or python3)"; exit 1; }
	@mkdir -p .aep-emulator
	@umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(24))' > $@.tmp && mv $@.tmp $@

demo: $(READY)
	$(BIN)/aep-exporter demo

test: $(READY) tools
	$(BIN)/pytest

# The suite again, under coverage (about twice as slow: CPython 3.11 traces every line).
coverage: $(READY) tools
	$(BIN)/pytest --cov=exporter --cov=aep_emulator --cov-branch --cov-report=term:skip-covered

# Azurite (Azure Blob on loopback) for the storage tests, from npm into .tools/ (not in git).
AZURITE := .tools/node_modules/.bin/azurite-blob
tools: $(AZURITE)
$(AZURITE):
	@command -v npm >/dev/null || { echo "npm is needed for Azurite (the storage tests)"; exit 1; }
	npm install --prefix .tools --no-audit --no-fund --loglevel=error azurite@3.37.0

lint: $(READY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

check: lint test

# The runtime alone, as `pip install aep-exporter` gives it, in a scratch venv: the commands
# that need no extra load, and the emulator answers with the extra to install.
check-runtime:
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is needed (python3.11 or python3)"; exit 1; }
	set -e; venv="$$(mktemp -d)"; trap 'rm -rf "$$venv"' EXIT; \
	$(PYTHON) -m venv "$$venv"; \
	"$$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check .; \
	for module in pyarrow jsonschema redis obstore asyncssh; do \
		if "$$venv/bin/python" -c "import $$module" 2>/dev/null; then \
			echo "$$module is installed without its extra"; exit 1; fi; \
	done; \
	"$$venv/bin/aep-exporter" --help >/dev/null; \
	for command in export probe lanes run status validate check datasets; do "$$venv/bin/aep-exporter" $$command --help >/dev/null; done; \
	status=0; message="$$(timeout 60 "$$venv/bin/aep-exporter" emulator 2>&1)" || status=$$?; \
	echo "$$message"; test "$$status" -eq 2; \
	case "$$message" in *"pip install 'aep-exporter[emulator]'") ;; *) exit 1;; esac

bench-emulator: $(READY)
	$(BIN)/python bench/emulator_runs.py

bench-engine: $(READY)
	$(BIN)/python bench/engine_exports.py

bench-daemon: $(READY)
	$(BIN)/python bench/daemon_spool.py

# An hour with about 1,000 runs in flight (docs/benchmarks.md, "Soak"); draws docs/soak.png.
bench-delivery: $(READY)
	$(BIN)/python bench/delivery_verify.py

bench-soak: $(READY)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .tools .demo .aep-emulator .pytest_cache .mypy_cache .ruff_cache .coverage
