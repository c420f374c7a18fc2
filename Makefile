# Ember — the commands a newcomer needs. See README.md.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
BENCHES := eventlog api scheduler edge boot deploy
QUICK ?=

.PHONY: bootstrap lint fmt typecheck test test-fast demo bench $(addprefix bench-,$(BENCHES)) schema openapi clean guest

bootstrap:  ## install missing Debian packages and the project into .venv (idempotent)
	@bash scripts/bootstrap.sh

lint: bootstrap  ## ruff, import contracts, mypy (strict on ember.core)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports
	$(BIN)/mypy

fmt: bootstrap
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

test: bootstrap lint  ## everything: lint + unit + integration + e2e
	$(BIN)/pytest -q

test-fast: bootstrap
	$(BIN)/pytest -q tests/unit

guest: bootstrap  ## build the microVM kernel, init and initramfs into guest/build (cached)
	$(PY) guest/build.py --out guest/build

demo: bootstrap  ## bring up the single-node stack and show the control plane working
	@bash scripts/demo.sh

bench: $(addprefix bench-,$(BENCHES))

# A static pattern rule: make never applies a plain pattern rule to a .PHONY target.
$(addprefix bench-,$(BENCHES)): bench-%: bootstrap
	$(PY) -m ember.bench.$* $(if $(QUICK),--quick,) --out bench/results/$*.json

openapi: bootstrap  ## regenerate docs/specs/openapi.json from the API
	$(PY) -m ember.api.openapi docs/specs/openapi.json

.PHONY: manifest-schema
manifest-schema: bootstrap  ## regenerate docs/specs/manifest.schema.json from the manifest model
	$(BIN)/ember manifest schema > docs/specs/manifest.schema.json.tmp
	mv docs/specs/manifest.schema.json.tmp docs/specs/manifest.schema.json

schema: bootstrap  ## regenerate docs/specs/db-schema.sql from the migrations
	$(PY) -m tests.support.schema_snapshot --write docs/specs/db-schema.sql

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
