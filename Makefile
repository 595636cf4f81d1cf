# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= etc/est.properties
SOURCES := $(shell find estgw twisted -name '*.py') setup.cfg pyproject.toml

.PHONY: install run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	$(PY) -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' 2>/dev/null || true
	touch $@

run: install
	$(VENV)/bin/twistd -n estgw --config $(CONFIG)

test: install
	$(PY) -b -W error::DeprecationWarning -m twisted.trial --temp-directory=/tmp/estgw-trial-$$$$ tests

bench: install
	$(PY) bench/enroll_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
