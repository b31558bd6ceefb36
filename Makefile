# The two set-up commands of the README: each creates .venv when missing, installs the
# project into it, then runs. torch==2.13.0 is installed first where no torch is present,
# because that CPU build lies on disk while a bare `pip install torch` pulls several GB.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test bench setup clean reliability
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bin/prefetch-bench $(BENCH_ARGS)

# The long reliability suite (soak, fault storms, crash points, fuzzing): a table at the end.
reliability: $(STAMP)
	$(PY) -m tests.reliability.run $(RELIABILITY_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache data/generated
