# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= etc/est.properties
SOURCES := $(shell find estgw twisted -name '*.py') setup.cfg pyproject.toml

.PHONY: install run test typecheck bench clean

install: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	$(PY) -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' 2>/dev/null || true
	touch $@

# In the foreground (-n), so no pid file (--pidfile=): Ctrl-C stops it.
run: install
	$(VENV)/bin/twistd -n --pidfile= estgw --config $(CONFIG)

# trial's working directory (state directories, CAs, logs) is removed
# afterwards; KEEP_TEMP=1 keeps it to look into a failure.
test: install
	@tmp=$$(mktemp -d /tmp/estgw-trial-XXXXXX); \
	$(PY) -b -W error::DeprecationWarning -m twisted.trial --temp-directory=$$tmp/_trial_temp tests; \
	status=$$?; \
	if [ -n "$(KEEP_TEMP)" ]; then echo "trial's files kept in $$tmp"; else rm -rf "$$tmp"; fi; \
	exit $$status

# mypy with the zope.interface plugin, as configured in mypy.ini.
typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(PY) bench/enroll_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
