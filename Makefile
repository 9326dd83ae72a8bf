# Two commands do all set-up on a fresh machine:  make demo  /  make test
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
DURATION ?= 60
# Empty: a clean baseline, then the default mix of incidents (agentwatch demo --help);
# INCIDENT=none keeps the whole run clean; INCIDENT="loop drift" injects those only.
INCIDENT ?=

.PHONY: install demo test bench system-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch wheel first: a bare "torch" requirement would pull GBs of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian's prometheus for the scrape test (tests start their own on a free port).
system-deps:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	    && (service prometheus stop >/dev/null 2>&1 || true); \
	  else echo "prometheus missing and not root: its test will be skipped"; fi; }

demo: $(STAMP)
	$(VENV)/bin/agentwatch demo --duration $(DURATION) $(foreach i,$(INCIDENT),--incident $(i))

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/agentwatch bench

clean:
	rm -rf $(VENV) build dist *.egg-info agentwatch-data
