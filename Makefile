# Tessera developer entry points. `make run` and `make test` are the README's two commands.
VENV      ?= $(CURDIR)/.venv
PY        := $(VENV)/bin/python
RUN_DIR   ?= $(CURDIR)/.run
ENDPOINT  ?= unix://$(RUN_DIR)/csi.sock
PYTEST_ARGS ?=

.PHONY: run test deps-core deps-all proto proto-check schema unit e2e image bench clean

## run: install what the file backend needs, then serve the driver on the embedded default (file backend)
run: deps-core
	$(VENV)/bin/tessera-csi serve --endpoint $(ENDPOINT) --state-dir $(RUN_DIR)/state

## test: install everything (apt + venv), check generated code, run the whole suite
test: deps-all proto-check
	TESSERA_REQUIRE_ALL=1 $(PY) -m pytest tests $(PYTEST_ARGS)

deps-core:
	.ci/install-deps core

deps-all:
	.ci/install-deps all

## proto: regenerate csi/_pb from proto/csi.proto
proto:
	$(PY) proto/generate.py

proto-check:
	$(PY) proto/generate.py --check

## schema: regenerate deploy/config.schema.json and the chart's values schema from the config models
schema:
	$(PY) -m csi.config_schema --write

## unit: the fast host-only tests
unit:
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

## e2e: only the real-kernel guest stage
e2e: deps-all
	TESSERA_REQUIRE_ALL=1 $(PY) -m pytest tests/e2e $(PYTEST_ARGS)

## image: build deploy/image/Dockerfile with podman as tests/image does (store /var/cache/tessera-image; cached by
## the recipe's hash), then print the timings and the image's size
image: deps-all
	$(PY) -m tests.image.build

## bench: every benchmark, printing its figures
bench: deps-all
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(RUN_DIR) .pytest_cache
