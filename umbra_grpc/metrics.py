"""Prometheus metrics of one server process, served on UMBRA_METRICS_LISTEN.

Calls are counted by method and status code, with a latency histogram per method, from the
access-log interceptor's sink. Everything else is read when Prometheus scrapes, straight
from the objects that own the numbers (open streams, pool use, listener state, outbox
counters, timing-floor overruns, rate-limit refusals), so nothing here is a second copy
that could drift. Each server gets its own registry, so several can live in one process.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclasses.dataclass(frozen=True, slots=True)
class _Reading:
    name: str
    documentation: str
    kind: Literal["gauge", "counter"]
    read: Callable[[], float]


class _Readings(Collector):
    """Values read at scrape time."""

    def __init__(self) -> None:
        self.readings: list[_Reading] = []

    def collect(self) -> Iterator[Metric]:
        for reading in self.readings:
            family = GaugeMetricFamily if reading.kind == "gauge" else CounterMetricFamily
            yield family(reading.name, reading.documentation, value=reading.read())


class Metrics:
    """The metrics of one server: RPC counts and latencies, plus values read on scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Registered first, so its values open the page: a load balancer's check reads
        # `umbra_serving` within the few KiB it buffers (deploy/haproxy.cfg).
        self._readings = _Readings()
        self.registry.register(self._readings)
        self._rpcs = Counter(
            "umbra_rpcs",
            "Finished RPCs by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "umbra_rpc_duration_seconds",
            "RPC duration (streams: until they end) by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Counts one finished call (the access-log sink)."""
        self._rpcs.labels(method, code).inc()
        self._latency.labels(method).observe(seconds)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A value that goes up and down, read at scrape time."""
        self._readings.readings.append(_Reading(name, documentation, "gauge", read))

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A running total kept elsewhere, read at scrape time (`name` without `_total`)."""
        self._readings.readings.append(_Reading(name, documentation, "counter", read))

    def serve(self, listen: str) -> int:
        """Serves /metrics on `host:port` in a background thread; returns the port."""
        host, _, port = listen.rpartition(":")
        self._server, self._thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        bound: int = self._server.server_port
        return bound

    def stop(self) -> None:
        """Stops serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
