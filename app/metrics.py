"""Every Prometheus metric of the service, defined once.

Labels are bounded: model names come from the model repository, routes are templates, and
statuses are classes (2xx, 4xx, 5xx) - never a raw path or a client-supplied value.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

# from 0.25 ms to ~30 s, roughly x2 per bucket
LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.125,
    0.25,
    0.5,
    1.0,
    2.0,
    4.0,
    8.0,
    16.0,
    32.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

REQUEST_DURATION = Histogram(
    "tokserve_request_duration_seconds",
    "Time from request received to response sent.",
    ["route", "model", "status"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "tokserve_queue_wait_seconds",
    "Time an item waited in the batch queue before its forward pass started.",
    ["model", "op"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "tokserve_batch_size",
    "Items per forward pass.",
    ["model", "op"],
    buckets=BATCH_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "tokserve_inference_duration_seconds",
    "Duration of one batched forward pass, including host/device copies.",
    ["model", "op"],
    buckets=LATENCY_BUCKETS,
)
INSTANCE_BATCHES = Counter(
    "tokserve_instance_batches_total",
    "Batches started on each instance of a model (TOKSERVE_DEVICES, TOKSERVE_INSTANCES); "
    "instance is <device>/<index on that device>.",
    ["model", "op", "instance"],
)
INSTANCE_BUSY = Counter(
    "tokserve_instance_busy_seconds_total",
    "Seconds each instance of a model spent in forward passes: its rate is the instance's "
    "utilisation.",
    ["model", "op", "instance"],
)
QUEUE_DEPTH = Gauge(
    "tokserve_queue_depth",
    "Items waiting in the batch queue.",
    ["model", "op"],
)
CACHE_REQUESTS = Counter(
    "tokserve_cache_requests_total",
    "Token cache lookups by result: hit, miss, error (backend failed or value unreadable), "
    "invalid (a readable value that does not fit the model: wrong dtype, shape or ids).",
    ["result"],
)
CACHE_DURATION = Histogram(
    "tokserve_cache_duration_seconds",
    "Latency of cache calls.",
    ["backend", "op"],
    buckets=LATENCY_BUCKETS,
)
CACHE_BYTES = Gauge(
    "tokserve_cache_bytes",
    "Bytes held by the in-process cache.",
)
IN_FLIGHT = Gauge(
    "tokserve_requests_in_flight",
    "API requests being served now (at most TOKSERVE_MAX_IN_FLIGHT).",
)
REJECTED = Counter(
    "tokserve_rejected_total",
    "Requests or items refused without being computed.",
    ["reason"],
)
ITEM_ERRORS = Counter(
    "tokserve_item_errors_total",
    "Items that failed on their own (unreadable, refused, or their forward failed) while the "
    "request held them: a 207's failed slots, each item of a list that failed whole, a single "
    "item's problem. status is the item's HTTP status code.",
    ["model", "op", "status"],
)
TOKENS = Counter(
    "tokserve_tokens_total",
    "Tokens produced by encode or consumed by decode.",
    ["model", "op"],
)
MODEL_INFO = Info(
    "tokserve_model",
    "Loaded models: backend, modality, version and device.",
    ["model"],
)
BUILD_INFO = Info("tokserve_build", "tokserve version and its runtime.")
STREAMS_OPEN = Gauge(
    "tokserve_streams_open",
    "Live audio streams (WebSocket encode or decode) open now.",
    ["model", "op"],
)
STREAM_CHUNK_LATENCY = Histogram(
    "tokserve_stream_chunk_latency_seconds",
    "From the arrival of the input that completed a stream's step to its result being sent.",
    ["model", "op"],
    buckets=LATENCY_BUCKETS,
)
STREAM_STEP_BATCH = Histogram(
    "tokserve_stream_step_batch_size",
    "Streams stepped together in one forward.",
    ["model", "op"],
    buckets=BATCH_BUCKETS,
)
STREAMS_DROPPED = Counter(
    "tokserve_streams_dropped_total",
    "Streams the server ended early, by close code (4408: the client read too slowly).",
    ["model", "op", "code"],
)
