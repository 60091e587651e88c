# site-agent: the two commands a newcomer needs are `make demo` and `make test`.
# Both bootstrap everything: a pinned uv in .tools/, the locked environment in .venv/, and,
# when run as root, the Debian packages the real-server tests need.

PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
RUN := $(VENV)/bin
DEBIAN_PACKAGES := mosquitto prometheus slurm-wlm munge systemd chromium chromium-driver
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: demo test lint typecheck check bench system-deps env clean

$(UV):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "site-agent needs Python 3.11+"'
	@$(PYTHON) -m venv $(TOOLS) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv && $(PYTHON) -m venv $(TOOLS); \
	  else echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv) and retry" >&2; exit 1; fi; }
	$(TOOLS)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	@touch $@

env: $(VENV)/.synced

# Real-server tests need these; without root they skip and say why.
system-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi; \
	else echo "not root: skipping Debian packages ($(DEBIAN_PACKAGES)); real-server tests will skip"; fi

demo: env
	$(RUN)/site-agent demo --duration 60

test: env system-deps
	$(RUN)/ruff check .
	$(RUN)/ruff format --check .
	$(RUN)/mypy
	$(RUN)/pytest

lint: env
	$(RUN)/ruff check . && $(RUN)/ruff format --check .

typecheck: env
	$(RUN)/mypy

bench: env
	$(RUN)/python bench/miners_poll.py

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
