# Everything a fresh clone needs: `make run` serves, `make test` checks it all.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
PROTOC = $(BIN)/python -m grpc_tools.protoc -I protos \
	--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc
PG_URL_LOCAL ?= postgresql://postgres@127.0.0.1:5432/postgres

.PHONY: help install run test pytest lint breaking generate check-generated audit bench \
	bench-smoke clean test-cluster test-pgbouncer

help:
	@echo "make run    serve on 127.0.0.1:50051 (embedded PostgreSQL unless UMBRA_DATABASE_URL is set)"
	@echo "make test   lint, type-check, buf breaking, generated-code check, pip-audit and the whole test suite"
	@echo "make generate   regenerate generated/ from protos/"
	@echo "make bench  measure the service against an echo RPC (docs/PERFORMANCE.md)"
	@echo "make test-cluster   deploy/'s topology on this machine through failovers (docs/SCALING.md)"
	@echo "make test-pgbouncer   the whole suite with the service behind PgBouncer (docs/SCALING.md)"

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(BUF): package.json
	npm install --no-audit --no-fund --silent
	touch $@

install: $(BIN)/.installed $(BUF)

run: $(BIN)/.installed
	$(BIN)/umbra-grpc serve

generate: $(BIN)/.installed
	rm -rf generated/umbra
	mkdir -p generated
	$(PROTOC) --python_out=generated --grpc_python_out=generated \
		--mypy_out=generated --mypy_grpc_out=generated $(PROTO_FILES)

# Fails when protos/ and generated/ disagree: regenerate into a scratch folder and compare.
check-generated: $(BIN)/.installed
	rm -rf .generated-check && mkdir -p .generated-check
	$(PROTOC) --python_out=.generated-check --grpc_python_out=.generated-check \
		--mypy_out=.generated-check --mypy_grpc_out=.generated-check $(PROTO_FILES)
	diff -r -x __pycache__ generated/umbra .generated-check/umbra || \
		(echo "generated/ is stale: run 'make generate' and commit"; exit 1)
	rm -rf .generated-check

lint: $(BIN)/.installed $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint
	$(BUF) format --diff --exit-code

# Fails when protos/ would break clients built from the previous commit's protos (HEAD's first
# parent, i.e. main before a merge; BUF_BREAKING_AGAINST=REV compares with another revision).
breaking: $(BUF)
	BUF=$(BUF) .ci/buf-breaking

# Fails on any known vulnerability. Packages the vulnerability service cannot look up are
# listed as skipped, not failed (on machines whose registry mirror has no JSON API).
audit: $(BIN)/.installed
	$(BIN)/pip-audit --skip-editable --progress-spinner off

# The suite runs on a throwaway PostgreSQL 16 (pgserver), then again on the machine's
# PostgreSQL at 127.0.0.1:5432 when one answers. Exit code 5 (no tests ran) fails the run.
pytest: $(BIN)/.installed
	$(BIN)/pytest
	@if $(BIN)/python -m umbra_grpc.embedded probe '$(PG_URL_LOCAL)'; then \
		echo "== again on $(PG_URL_LOCAL)"; \
		UMBRA_TEST_DATABASE_URL='$(PG_URL_LOCAL)' $(BIN)/pytest; \
	else echo "== no PostgreSQL at $(PG_URL_LOCAL): second run skipped"; fi

test: lint breaking check-generated audit pytest

# Bounded (about 4 minutes here); writes bench/results/latest.json and docs/PERFORMANCE.md.
bench: $(BIN)/.installed
	$(BIN)/python -m bench.run

# Every bench section with tiny sizes, in seconds (tests/e2e/test_bench_smoke.py runs it too).
bench-smoke: $(BIN)/.installed
	$(BIN)/python -m bench.run --smoke --out bench/results/smoke.json

# HAProxy, PgBouncer, Patroni + etcd and two replicas on loopback ports, a switchover, a
# killed primary and a killed replica (installs Debian packages: CI and test machines only).
test-cluster: $(BIN)/.installed
	bash cluster/test-cluster.sh

# The whole suite with every service under test behind PgBouncer in transaction mode and its
# LISTEN connection direct (installs Debian's pgbouncer when missing). PYTEST_ARGS picks tests.
test-pgbouncer: $(BIN)/.installed
	bash cluster/test-pgbouncer.sh $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) node_modules .generated-check .pytest_cache .mypy_cache .ruff_cache
