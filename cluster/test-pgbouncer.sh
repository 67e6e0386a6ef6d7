#!/usr/bin/env bash
# `make test-pgbouncer`: the whole suite with every service under test behind PgBouncer in
# transaction mode, its LISTEN connection direct (cluster/pgbouncer_suite.py). Installs
# Debian's pgbouncer when missing (never done by `make test`); tears everything down on any
# exit, interrupts included. Arguments go to pytest (e.g. tests/outbox -x).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v pgbouncer >/dev/null 2>&1; then
  echo "== installing pgbouncer"
  apt-get update -qq
  # policy-rc.d (present on this kind of machine) keeps the package's own service stopped.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null
fi
WORKDIR=$(mktemp -d /tmp/umbra-pgbouncer.XXXXXX)
trap '.venv/bin/python -m cluster.pgbouncer_suite --teardown "$WORKDIR"' EXIT
trap 'exit 130' INT TERM
.venv/bin/python -m cluster.pgbouncer_suite "$WORKDIR" "$@"
