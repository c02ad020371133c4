# txrdsproxy developer targets.  All setup logic lives in scripts/setup.sh.
PYTHON := .venv/bin/python

.PHONY: setup test demo bench soak fuzz clean distclean

setup:
	@bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest tests

demo: setup
	$(PYTHON) scripts/demo.py

bench: setup
	$(PYTHON) bench/run.py

# Not part of `make test`: SOAK_SECONDS (default 600) of mixed load, isolation checks, figures.
soak: setup
	$(PYTHON) soak/run.py

# Longer random runs of the classifiers' differential tests against the real servers (CI runs
# them with a fixed seed and few examples).  TXRDSPROXY_FUZZ_EXAMPLES sets the number of examples.
fuzz: setup
	TXRDSPROXY_FUZZ=1 CI=true $(PYTHON) -m pytest -q -p no:cacheprovider \
		tests/integration/test_mysql_classifier_differential.py \
		tests/unit/test_pg_lexer.py tests/integration/test_pg_classifier_differential.py

clean:
	rm -rf .pytest_cache build dist *.egg-info .state .venv/.setup-stamp twisted/plugins/dropin.cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf .venv
