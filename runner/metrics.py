"""Prometheus metrics, defined once for the process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("runner_requests_total", "Generate requests answered", ["pipeline", "status"])
INFERENCE_SECONDS = Histogram(
    "runner_inference_seconds", "Time inside a pipeline's run()", ["pipeline", "model"],
    buckets=SECONDS)
QUEUE_WAIT_SECONDS = Histogram(
    "runner_queue_wait_seconds", "Time a request waited for its model's worker", ["model"],
    buckets=SECONDS)
QUEUE_DEPTH = Gauge("runner_queue_depth", "Requests admitted and not yet finished", ["model"])
CANCELLED = Counter("runner_cancelled_total",
                    "Requests whose client went away mid-run (the run was stopped)")
REJECTED = Counter("runner_rejected_total",
                   "Requests refused: busy for now (every runner.errors.BusyReason) or too "
                   "large ever to fit (too_large, a 422)", ["model", "reason"])

CACHE_REQUESTS = Counter("runner_cache_requests_total",
                         "Requests whose model was on the device (hit) or not (miss)",
                         ["model", "result"])
CACHE_LOADS = Counter("runner_model_loads_total", "Models brought to the device",
                      ["model", "source", "outcome"])
LOAD_SECONDS = Histogram("runner_model_load_seconds", "Time to bring a model to the device",
                         ["model", "source"], buckets=SECONDS)
CACHE_EVICTIONS = Counter("runner_model_evictions_total", "Models dropped from memory", ["model"])
CACHE_DEMOTIONS = Counter("runner_model_demotions_total", "Models moved to the host tier",
                          ["model"])
EVICTION_SECONDS = Histogram("runner_model_eviction_seconds",
                             "Time to move a model off the device, by the tier it went to",
                             ["tier"], buckets=SECONDS)
RESIDENT_BYTES = Gauge("runner_resident_bytes", "Bytes held by models, per tier", ["tier"])
RUNNING_BYTES = Gauge("runner_running_bytes", "Working memory reserved by running requests")
BUDGET_BYTES = Gauge("runner_budget_bytes", "Device bytes the cache may use now")
FOREIGN_BYTES = Gauge("runner_foreign_bytes",
                      "Device bytes held by others, or not given back by unloads")
LEAKED_BYTES = Counter("runner_unload_shortfall_bytes_total",
                       "Bytes unloads did not give back to the device")
OOMS = Counter("runner_out_of_memory_total", "Runs that ran out of device memory", ["model"])
ESTIMATE_RATIO = Gauge("runner_estimate_ratio",
                       "Measured over estimated weight bytes of a model's last load", ["model"])
ACTIVATION_RATIO = Gauge("runner_activation_ratio",
                         "Measured over estimated working memory of a model's last solo run",
                         ["model"])
