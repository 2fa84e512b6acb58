"""Prometheus metrics of the model server, in a registry of its own (``/metrics``).

=============================================  =========  ===========================  ============================
metric                                         type       labels                       recorded by
=============================================  =========  ===========================  ============================
``enclaveml_serving_requests_total``           counter    model, protocol, code        the frontends, per request
``enclaveml_serving_request_seconds``          histogram  model, protocol              the frontends, per request
``enclaveml_serving_batch_size``               histogram  model                        ``DynamicBatcher``, per run
``enclaveml_serving_model_load_seconds``       gauge      model, version               the repository, at scrape
``enclaveml_serving_model_decrypt_seconds``    gauge      model, version               the repository, at scrape
``enclaveml_serving_model_ready``              gauge      model                        the repository, at scrape
=============================================  =========  ===========================  ============================

``protocol`` is one of ``tfserving-grpc``, ``kserve-grpc``, ``kserve-rest``, ``tfserving-rest``
(free text, kept short); ``code`` is the gRPC status name or the HTTP status the request got.
The model gauges are read from the attached ``ModelRepository`` when Prometheus scrapes, so
an unloaded version disappears instead of leaving a stale value.

Label values are bounded: a request for a model the server does not know is counted under
``model="_unknown"`` (a client must not be able to create series at will).

Recording is on every request's path, so the labelled children are looked up once per label
set and kept (``labels()`` takes a lock and builds a key each time); the kept ones are as
bounded as the label values.

A registry of its own, not the process-wide default: two servers in one process (tests)
keep separate counts, and no library's metrics leak into ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from enclaveml.serving.errors import RequestError

if TYPE_CHECKING:
    from enclaveml.serving.repository import ModelRepository

__all__ = ["BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS", "UNKNOWN_MODEL", "ServingMetrics"]

UNKNOWN_MODEL = "_unknown"
#: Seconds: from a millisecond (a small tabular model) to tens of seconds (a large batch in an enclave).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Rows per model run.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _RepositoryCollector(Collector):
    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    def collect(self) -> Iterator[Metric]:
        load = GaugeMetricFamily(
            "enclaveml_serving_model_load_seconds",
            "Seconds to build the inference session of a loaded model version",
            labels=["model", "version"],
        )
        decrypt = GaugeMetricFamily(
            "enclaveml_serving_model_decrypt_seconds",
            "Seconds to read, verify and decrypt a loaded model version",
            labels=["model", "version"],
        )
        ready = GaugeMetricFamily(
            "enclaveml_serving_model_ready", "1 when the model has an available version", labels=["model"]
        )
        for name in self._repository.names():
            try:
                served = self._repository.get(name)
            except RequestError:  # ModelNotReady: no available version
                ready.add_metric([name], 0.0)
                continue
            ready.add_metric([name], 1.0)
            load.add_metric([name, str(served.version)], served.load_seconds)
            decrypt.add_metric([name, str(served.version)], served.decrypt_seconds)
        yield load
        yield decrypt
        yield ready


class ServingMetrics:
    """The server's metrics (see the module docstring); ``render()`` answers ``GET /metrics``.

    ``models``: the model names that may appear as labels (others become ``_unknown``);
    ``None`` takes them from the attached repository, or accepts any name when there is none.
    """

    def __init__(self, *, models: Collection[str] | None = None, repository: ModelRepository | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._models = None if models is None else frozenset(models)
        self._repository: ModelRepository | None = None
        self._request_children: dict[tuple[str, str, str | int], tuple[Any, Any]] = {}
        self._batch_children: dict[str, Any] = {}
        self.requests = Counter(
            "enclaveml_serving_requests",
            "Requests answered, by model, protocol and status code",
            ["model", "protocol", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "enclaveml_serving_request_seconds",
            "Seconds from a request's arrival to its answer",
            ["model", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "enclaveml_serving_batch_size",
            "Rows per model run (after dynamic batching)",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        if repository is not None:
            self.attach(repository)

    def attach(self, repository: ModelRepository) -> None:
        """Report ``repository``'s model gauges at every scrape (once per metrics object)."""
        if self._repository is not None:
            raise ValueError("a repository is already attached")
        self._repository = repository
        if self._models is None:  # a repository's model names are fixed when it is made
            self._models = frozenset(repository.names())
        self.registry.register(_RepositoryCollector(repository))

    def _label(self, model: str) -> str:
        allowed = self._models
        return model if allowed is None or model in allowed else UNKNOWN_MODEL

    def record_request(self, model: str, protocol: str, code: str | int, seconds: float) -> None:
        """One answered request: ``code`` is the gRPC status name (``OK``) or the HTTP status (200)."""
        label = self._label(model)
        key = (label, protocol, code)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(label, protocol, str(code)), self.request_seconds.labels(label, protocol))
            self._request_children[key] = children
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)

    def observe_batch(self, model: str, rows: int) -> None:
        """One model run over ``rows`` rows (``DynamicBatcher(on_batch=...)``)."""
        label = self._label(model)
        child = self._batch_children.get(label)
        if child is None:
            child = self._batch_children[label] = self.batch_size.labels(label)
        child.observe(rows)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
