# Two commands on a fresh machine: `make demo` (quickstart, no downloads) and `make test`.
# Each creates ./.venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on disk here; pinning it keeps pip from pulling a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test fuzz format clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench]" "$(TORCH)"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -m ruff check gpart tests examples benchmarks docs
	$(PY) -m ruff format --check gpart tests examples benchmarks docs
	$(PY) -m pytest -q

# The long fuzz profile: 2,000 cases per fuzz test (6,000 in all), counts in benchmarks/results/fuzz.json.
fuzz: $(VENV)/.installed
	GPART_FUZZ=2000 GPART_FUZZ_REPORT=benchmarks/results/fuzz.json $(PY) -m pytest -q -p no:randomly tests/test_fuzz.py

format: $(VENV)/.installed
	$(PY) -m ruff format gpart tests examples benchmarks docs
	$(PY) -m ruff check --fix gpart tests examples benchmarks docs

clean:
	rm -rf $(VENV) build *.egg-info
