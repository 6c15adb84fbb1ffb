"""Every setting of the service, read once from the environment (prefix ``TOKSERVE_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_DIR = str(Path(__file__).resolve().parent.parent / "models")
DEFAULT_LAYOUT_DIR = str(Path(__file__).resolve().parent.parent / "layouts")


def _split_list(value: object) -> object:
    """Accept ``a,b`` strings from the environment as lists (an API key may contain ':')."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Service configuration; a model's config.json sets its own batching unless overridden here."""

    model_config = SettingsConfigDict(env_prefix="TOKSERVE_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 8000
    model_dir: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [DEFAULT_MODEL_DIR])
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # LLM sequence layouts (tokserve_client.layouts): every *.json whose models are all loaded
    layout_dir: str = DEFAULT_LAYOUT_DIR
    device: str = "auto"
    # One instance of every model per device listed (cpu, cuda:0, cuda:1, ...; a device listed
    # twice gets two); empty: TOKSERVE_DEVICE alone. Each instance has its own worker thread, fed
    # by the model's one queue per op: whichever instance is free takes the next batch.
    devices: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Instances of every model on each device of TOKSERVE_DEVICES (or on TOKSERVE_DEVICE); "auto":
    # one per GPU, and on the CPU one per usable core, at most four, the cores split between them
    # as torch threads (app.compute.auto_instances; docs/performance.md measures why).
    instances: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    redis_url: str | None = None
    redis_timeout_ms: float = 50.0
    # Each Redis call also gets its bytes' transfer time at this rate: large values are not slow.
    redis_min_mb_per_s: float = Field(default=25.0, gt=0)
    redis_breaker_failures: int = 5
    redis_breaker_cooldown_s: float = 2.0
    cache_ttl_s: int = 7 * 24 * 3600
    cache_decode: bool = False
    cache_max_bytes: int = 256 * 1024 * 1024

    max_body_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0
    # Across the items of one request: bounds its compute and its decode response's bytes.
    max_request_audio_seconds: float = Field(default=600.0, gt=0)
    # Below this a header's rate is nonsense (a 644-byte WAV at 1 Hz "lasts" 600 s once resampled).
    min_audio_sample_rate: int = Field(default=8000, ge=1)
    max_items: int = Field(default=64, ge=1)
    max_decode_tokens: int = Field(default=1_000_000, ge=1)
    request_timeout_s: float = 30.0
    # API requests served at once; the next are answered 503 before their bodies are read.
    max_in_flight: int = Field(default=64, ge=1)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # With API keys set, /docs, /openapi.json and /metrics need one too unless opened here.
    public_docs: bool = False
    public_metrics: bool = False

    # Live streams (WebSocket /v1/audio/stream/...): how many at once, in all and per API key;
    # the input one may hold unstepped before the server stops reading it (backpressure), and
    # the results it may leave unread before it is dropped; frames and streams per step.
    stream_max_streams: int = Field(default=64, ge=1)
    stream_max_streams_per_key: int = Field(default=16, ge=1)
    stream_max_buffered_s: float = Field(default=2.0, gt=0)
    stream_max_unsent_s: float = Field(default=10.0, gt=0)
    stream_max_step_frames: int = Field(default=16, ge=1)
    stream_max_batch: int = Field(default=32, ge=1)
    stream_max_message_bytes: int = Field(default=1 << 20, ge=1024)
    # a stream whose client sends nothing this long is closed (4408): it holds a slot otherwise
    stream_idle_timeout_s: float = Field(default=30.0, gt=0)

    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    max_queue: int | None = None
    warmup: bool = True
    drain_timeout_s: float = 30.0
    # Idle HTTP connections stay open this long: longer than load balancers keep theirs (nginx
    # and cloud LBs: 60 s), so a proxy never reuses a connection the server has just closed.
    keep_alive_s: int = Field(default=75, ge=1)
    # Nice value of the media threads (decoding uploads, encoding answers, parsing bodies): above
    # the model threads' 0, so a forward's OpenMP threads are not preempted when cores are
    # contended. The event loop keeps the process's own: it answers /healthz and admits requests.
    request_nice: int = Field(default=5, ge=0, le=19)

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    # OpenTelemetry traces, sent over OTLP/HTTP to {otel_endpoint}/v1/traces (needs the `otel`
    # extra); off when unset. OpenTelemetry's own OTEL_EXPORTER_OTLP_ENDPOINT sets it too.
    otel_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TOKSERVE_OTEL_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    )

    @field_validator("model_dir", mode="before")
    @classmethod
    def _model_dirs(cls, value: object) -> object:
        # Paths are colon-separated like PATH; commas would be legal in a directory name.
        if isinstance(value, str):
            return [part for part in value.split(":") if part]
        return value

    @field_validator("models", "api_keys", "devices", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)
