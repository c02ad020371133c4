# txrdsproxy developer targets.  All setup logic lives in scripts/setup.sh.
#
# PYTHON is the interpreter the virtualenv is built with.  The default (python3, CPython) uses
# .venv; any other builds its own venv beside it, e.g. `make setup PYTHON=pypy3` makes .venv-pypy3
# with Debian's PyPy, and `make test PYTHON=pypy3`, `make bench PYTHON=pypy3`... then run there.
PYTHON := python3
VENV := $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
PY := $(VENV)/bin/python
export PYTHON VENV

.PHONY: setup test test-pypy demo bench soak fuzz clean distclean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests

# PyPy (`make test` is CPython only: building .venv-pypy3 takes minutes to most of an hour).
# 1. the unit tests on PyPy; 2. an integration subset with the proxy in the PyPy test process,
# driven by psql, pgbench, PyMySQL and mysql-connector's pure-Python mode (psycopg's pure-Python
# libpq binding fails inside PyPy 7.3.11's ctypes, asyncpg has no PyPy build, mysql-connector's
# C extension is CPython only); 3. the proxy as a PyPy twistd process in front of PostgreSQL and
# MariaDB, driven from CPython by psycopg, pgbench, PyMySQL and sysbench
# (tests/integration/test_proxy_on_pypy.py; it fails, never skips, without .venv-pypy3).
PYPY_INTEGRATION := tests/integration/test_pg_clients.py tests/integration/test_mysql_clients.py
PYPY_DESELECT := not psycopg and not cext and not large_result and not long_query
test-pypy:
	$(MAKE) setup
	$(MAKE) setup PYTHON=pypy3
	.venv-pypy3/bin/python -m pytest tests/unit
	.venv-pypy3/bin/python -m pytest $(PYPY_INTEGRATION) -k "$(PYPY_DESELECT)"
	TXRDSPROXY_PYPY=1 .venv/bin/python -m pytest tests/integration/test_proxy_on_pypy.py

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) bench/run.py

# Not part of `make test`: SOAK_SECONDS (default 600) of mixed load, isolation checks, figures.
soak: setup
	$(PY) soak/run.py

# Longer random runs of the classifiers' differential tests against the real servers (CI runs
# them with a fixed seed and few examples).  TXRDSPROXY_FUZZ_EXAMPLES sets the number of examples.
fuzz: setup
	TXRDSPROXY_FUZZ=1 CI=true $(PY) -m pytest -q -p no:cacheprovider \
		tests/integration/test_mysql_classifier_differential.py \
		tests/unit/test_pg_lexer.py tests/integration/test_pg_classifier_differential.py

clean:
	rm -rf .pytest_cache build dist *.egg-info .state .venv*/.setup-stamp twisted/plugins/dropin.cache
	find . -path './.venv*' -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf .venv .venv-*
