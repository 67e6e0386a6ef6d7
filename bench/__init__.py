"""Runnable benchmarks of the service, measured against an empty "echo" RPC (SPEC 8).

`python -m bench.run` starts a private PostgreSQL, seeds it, starts the server (`bench.server`)
in its own process and drives it from separate client processes (`bench.client`); it writes
`bench/results/latest.json` and regenerates `docs/PERFORMANCE.md`. `--smoke` runs every
section with tiny sizes in seconds (CI runs it through tests/e2e/test_bench_smoke.py).
"""
