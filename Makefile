# Each target sets up its venv from scratch when needed. The project's own env (.venv: demo, tests) installs exactly
# requirements.lock; `make lock` regenerates that file from a fresh resolve of pyproject's ranges. torch is always
# pinned to the local CPU wheel (constraints.txt): an unpinned torch pulls a multi-GB CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# `make test-latest`: the newest releases that pyproject allows, in a git-ignored env of its own.
LATEST := .venv-latest
# `make test-oldest`: the lowest versions that pyproject allows for the packages we build on.
OLDEST := .venv-oldest
# Never re-resolve what the lock pins: the editable install adds only our own package.
EDITABLE := install -q --no-deps --no-build-isolation -e .

.PHONY: setup demo test test-fast test-latest test-oldest lock bench lint format docs mutation

$(STAMP): $(LOCK) pyproject.toml
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -r $(LOCK)
	$(PIP) $(EDITABLE)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# A fresh resolve of pyproject's ranges (test, docs, mutation extras), frozen into requirements.lock. On purpose:
# to take a new transformers/PEFT release, after changing a range in pyproject.toml; then `make test`.
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q -c constraints.txt torch==2.13.0
	.venv-lock/bin/pip install -q -c constraints.txt ".[test,docs,mutation]"
	.venv-lock/bin/python scripts/write_lock.py > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK); run 'make test' on it, then commit it"

# The newest releases pyproject allows: zoo-wide tests and a drift report against the lock. Exits non-zero only when
# a model type that the lock supports regresses. Not part of CI (CI runs on the lock and stays deterministic).
test-latest:
	test -x $(LATEST)/bin/python || python3 -m venv $(LATEST)
	$(LATEST)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(LATEST)/bin/pip install -q -c constraints.txt --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST)/bin/python scripts/drift_report.py

# The lowest versions pyproject allows for transformers, PEFT and accelerate, on top of the lock; the whole suite.
test-oldest:
	rm -rf $(OLDEST)
	python3 -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q -c constraints.txt -r $(LOCK)
	$(OLDEST)/bin/pip install -q -c constraints.txt $$($(OLDEST)/bin/python scripts/lower_bounds.py transformers peft accelerate)
	$(OLDEST)/bin/pip $(EDITABLE)
	$(OLDEST)/bin/python -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/lora_linear.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check peft_vision_lora tests examples benchmarks scripts

format: $(STAMP)
	$(VENV)/bin/ruff format peft_vision_lora tests examples benchmarks scripts
	$(VENV)/bin/ruff check --fix .

# The documentation site with the API reference (docs/ pages + docstrings), built offline into site/. Needs the
# `docs` extra (mkdocs, mkdocstrings[python]) in the env; tests/test_docs.py builds it too.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

# Mutation testing (mutmut) of the core modules, each against the fast tests that cover it: ends with
# `mutation score: NN.N% (killed K of N)`, writes the survivors to .mutation/survivors.txt, fails below 85% on any
# module. Slow (an hour or more on 2 cores); not part of CI. Run it after changing a core module or its tests; one
# module: `make mutation MODULES=resolve.targets`. The env is the lock plus the `mutation` extra, kept apart.
MUTATION := .venv-mutation
MODULES ?=
mutation:
	test -x $(MUTATION)/bin/python || python3 -m venv $(MUTATION)
	$(MUTATION)/bin/pip install -q -c constraints.txt -r $(LOCK)
	$(MUTATION)/bin/pip $(EDITABLE)
	$(MUTATION)/bin/python scripts/mutation.py $(if $(MODULES),--modules $(MODULES))
