#!/usr/bin/env bash
# `make test-cluster`: the production topology of deploy/ on loopback ports of this machine,
# from nothing: installs the Debian packages it needs (never done by `make test`), runs the
# scenario (cluster/scenario.py) and tears everything down on any exit, interrupts included.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(haproxy pgbouncer patroni etcd-server postgresql-15)
missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  apt-get update -qq
  # policy-rc.d (present on this kind of machine) keeps the packages' own services stopped.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
WORKDIR=$(mktemp -d /tmp/umbra-cluster.XXXXXX)
trap '.venv/bin/python -c "import sys; from pathlib import Path; from cluster.topology import teardown; teardown(Path(sys.argv[1]))" "$WORKDIR"' EXIT
trap 'exit 130' INT TERM
# The scenario bounds itself (at most 5 minutes); this bounds bring-up and teardown too.
timeout --signal=INT 540 .venv/bin/python -m cluster "$WORKDIR"
