"""Prometheus metrics, defined once for the process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("runner_requests_total", "Generate requests answered", ["pipeline", "status"])
INFERENCE_SECONDS = Histogram(
    "runner_inference_seconds", "Time inside a pipeline's run()", ["pipeline", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
QUEUE_WAIT_SECONDS = Histogram(
    "runner_queue_wait_seconds", "Time a request waited for its model's worker", ["model"]
)
QUEUE_DEPTH = Gauge("runner_queue_depth", "Requests admitted and not yet finished", ["model"])
REJECTED = Counter("runner_rejected_total", "Requests refused with 503", ["model", "reason"])
CACHE_HITS = Counter("runner_cache_hits_total", "Requests whose model was already resident")
CACHE_LOADS = Counter("runner_model_loads_total", "Model loads", ["model", "outcome"])
CACHE_EVICTIONS = Counter("runner_model_evictions_total", "Models evicted to make room", ["model"])
LOAD_SECONDS = Histogram(
    "runner_model_load_seconds", "Time to load a model", ["model"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
RESIDENT_BYTES = Gauge("runner_resident_bytes", "Bytes held by resident models")
BUDGET_BYTES = Gauge("runner_budget_bytes", "Byte budget of the model cache")
ESTIMATE_RATIO = Gauge("runner_estimate_ratio",
                       "Measured over estimated bytes of a model's last load", ["model"])
