"""The OpenAPI document's models: every answer's body, and the per-route declarations of what a
route answers (its statuses, media types and headers).

The parts that depend on the loaded models (model names, token grid shapes, examples) are
added to the document by app/api/openapi.py; the declarations here refer to them by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from app.api.responses import MSGPACK, NPY

PROBLEM_JSON = "application/problem+json"
IMAGE_TYPES = ("image/png", "image/webp", "image/jpeg")
AUDIO_TYPES = ("audio/wav", "audio/flac", "audio/ogg")

TokenId = Annotated[int, Field(ge=0, description="A token id, 0 to the model's vocab_size - 1")]
TokenRows = list[list[TokenId]]
TokenDtype = Literal["uint16", "int32"]
Item = TypeVar("Item", bound=BaseModel)


class ItemProblem(BaseModel):
    """One item's problem: the slot of a failed item in a multi-item answer."""

    status: int = Field(description="The HTTP status this item would have answered alone")
    title: str
    detail: str = Field(description="What was wrong with this item and what is accepted")


class Problem(ItemProblem):
    """An RFC 9457 problem document (application/problem+json): every error answer."""

    type: str = Field("about:blank", description="Always about:blank: the status says it")
    items: list[ItemProblem] | None = Field(
        None, description="When every item of a list failed: each item's problem, in order"
    )


class ItemFailure(BaseModel):
    """A failed item's slot in a 207 Multi-Status answer."""

    error: ItemProblem


class LayoutWindow(BaseModel):
    start_s: float = Field(description="Where the window starts in the clip")
    duration_s: float
    ids: list[int] | None = Field(None, description="The window's span of ids in the layout")
    tokens: TokenRows | None = Field(None, description="Without a layout: the window's tokens")


class InLayout(BaseModel):
    ids: list[int] | None = Field(
        None, description="With ?layout=NAME: the item's span of ids in that layout"
    )
    windows: list[LayoutWindow] | None = Field(
        None, description="With ?window_s=S: the clip window by window (spans with a layout)"
    )


class ImageQuality(BaseModel):
    """With ?report=true: the reconstruction against the image as the model saw it."""

    psnr_db: float = Field(description="PSNR over the 0..255 levels of R, G and B, dB")
    ssim: float = Field(description="Mean SSIM of the luma over every 7 x 7 window")


class AudioQuality(BaseModel):
    """With ?report=true: the reconstruction against the clip as the model heard it."""

    snr_db: float = Field(description="Signal to noise ratio of the mono waves, dB")
    mel_distance: float = Field(
        description="Mean |log10 mel| difference: 80 bands, 1024-point frames every 256 samples"
    )


class ImageFigures(InLayout):
    shape: list[int] = Field(description="[h, w]: rows and columns of tokens")
    source_size: list[int] | None = Field(
        None, description="[width, height] of the upright source image; null if unreadable"
    )
    crop_box: list[float] | None = Field(
        None, description="[left, top, right, bottom] of the source the tokens cover, its pixels"
    )
    content_box: list[int] | None = Field(
        None, description="[left, top, right, bottom] the source fills in the model's image"
    )
    resize_filter: str | None = Field(
        None, description="The filter that resized the source: bicubic (after box reductions)"
    )
    quality: ImageQuality | None = Field(None, description="With ?report=true")
    cached: bool = Field(description="Answered from the token cache")


class ImageTokens(ImageFigures):
    """One image's tokens."""

    tokens: TokenRows = Field(description="Token ids: h rows of w ids")


class PackedTokens(BaseModel):
    """Tokens as a msgpack answer carries them: raw bytes and their dtype."""

    tokens: bytes = Field(description="The ids as little-endian `dtype`, row-major, `shape`")
    dtype: TokenDtype


class ImageTokensMsgpack(PackedTokens, ImageFigures):
    """One image's tokens, in a msgpack answer."""


class AudioFigures(InLayout):
    shape: list[int] = Field(description="[rows, F]: codebooks (or their rows) and frames")
    codebooks: int
    frames: int
    frame_rate: float = Field(description="Frames per second")
    sample_rate: int = Field(description="The model's sample rate, Hz")
    duration_s: float = Field(description="Audio covered by the tokens: frames / frame_rate")
    source_sample_rate: int | None = Field(None, description="The file's rate, Hz, as declared")
    source_channels: int | None = Field(None, description="The file's channels (mixed as needed)")
    samples: int | None = Field(None, description="The file's samples per channel, as declared")
    resampled: bool | None = Field(None, description="Resampled to the model's rate (soxr HQ)")
    downmixed: bool | None = Field(None, description="Its channels averaged to mono")
    tokens_per_frame: list[int] | None = Field(
        None, description="Codebooks at several rates (SNAC): each one's rows of the array"
    )
    quality: AudioQuality | None = Field(None, description="With ?report=true")
    cached: bool = Field(description="Answered from the token cache")


class AudioTokens(AudioFigures):
    """One clip's tokens."""

    tokens: TokenRows = Field(description="Token ids: k codebooks (rows) of F frames")


class AudioTokensMsgpack(PackedTokens, AudioFigures):
    """One clip's tokens, in a msgpack answer."""


class ItemsAnswer(BaseModel, Generic[Item]):
    """A multi-item answer: one slot per item, in order: its result, or (in a 207) its
    problem."""

    model: str = Field(description="The model that answered")
    version: str = Field(description="The model's version: 16 hex digits (X-Model-Version)")
    items: list[Item | ItemFailure]


class ImageEncodeResponse(ItemsAnswer[ImageTokens]):
    """One slot per image: its tokens, or (in a 207) its problem."""


class ImageEncodeMsgpack(ItemsAnswer[ImageTokensMsgpack]):
    """One slot per image, in msgpack: its tokens as bytes, or (in a 207) its problem."""


class AudioEncodeResponse(ItemsAnswer[AudioTokens]):
    """One slot per clip: its tokens, or (in a 207) its problem."""


class AudioEncodeMsgpack(ItemsAnswer[AudioTokensMsgpack]):
    """One slot per clip, in msgpack: its tokens as bytes, or (in a 207) its problem."""


class DecodedImage(BaseModel):
    data: str = Field(description="The image file, base64")
    media_type: Literal["image/png", "image/webp", "image/jpeg"]
    width: int
    height: int
    cached: bool = Field(description="Answered from the decode cache")


class DecodedImageMsgpack(DecodedImage):
    data: bytes = Field(description="The image file")  # type: ignore[assignment]


class DecodedAudio(BaseModel):
    data: str = Field(description="The audio file, base64")
    media_type: Literal["audio/wav", "audio/flac", "audio/ogg"]
    sample_rate: int = Field(description="Hz")
    duration_s: float
    cached: bool = Field(description="Answered from the decode cache")


class DecodedAudioMsgpack(DecodedAudio):
    data: bytes = Field(description="The audio file")  # type: ignore[assignment]


class DecodedImages(ItemsAnswer[DecodedImage]):
    """One slot per grid: the image in base64, or (in a 207) its problem."""


class DecodedImagesMsgpack(ItemsAnswer[DecodedImageMsgpack]):
    """One slot per grid, in msgpack: the image's bytes, or (in a 207) its problem."""


class DecodedAudios(ItemsAnswer[DecodedAudio]):
    """One slot per array: the audio in base64, or (in a 207) its problem."""


class DecodedAudiosMsgpack(ItemsAnswer[DecodedAudioMsgpack]):
    """One slot per array, in msgpack: the audio's bytes, or (in a 207) its problem."""


class ModelEntry(BaseModel):
    """What GET /v1/models says of every model; a backend may add fields of its own."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str = Field(description="16 hex digits: config, weights and dtype (and compute)")
    backend: str = Field(description="native, transformers, exported, or a plugin's")
    device: str
    dtype: str
    reproducibility: Literal["portable", "host"]
    compute: str = Field(description="The host's compute fingerprint")
    vocab_size: int = Field(description="Ids per codebook: 0 to vocab_size - 1")
    codebooks: int
    encode_only: bool = Field(description="No decoder: its decodes answer 422")
    extra: dict[str, Any] | None = Field(None, description="Backend-specific figures")
    max_batch_size: int = Field(description="Items per forward pass")
    source: str | None = Field(None, description="Where the weights come from, if named")


class ImageStream(BaseModel):
    name: str = Field(description="grid, sequence, or scale k of multi-scale maps")
    shape: list[int] = Field(description="[h, w] of the grid or map; [L] of a sequence")
    positions: list[int] | None = Field(
        None, description="A map's [start, stop) in the item's sequence of tokens"
    )
    vocab_size: int


class AudioStream(BaseModel):
    name: str = Field(description="codebook k")
    rows: list[int] = Field(description="Its rows of the token array")
    tokens_per_frame: int
    rate: float = Field(description="Its tokens per second")
    vocab_size: int


class ImageModel(ModelEntry):
    modality: Literal["image"]
    image_size: list[int] = Field(description="[H, W] pixels the model takes")
    grid: list[int] = Field(description="[h, w] tokens per image, or [L] for a sequence")
    downsample: int = Field(description="Pixels per token side (of the finest map); 0 for none")
    scales: list[list[int]] = Field(
        description="Multi-scale maps' [h, w], coarse to fine, their tokens one sequence; or empty"
    )
    streams: list[ImageStream]


class AudioModel(ModelEntry):
    modality: Literal["audio"]
    sample_rate: int = Field(description="Hz")
    channels: int
    hop_length: int = Field(description="Samples per frame")
    frame_rate: float = Field(description="Frames per second")
    tokens_per_frame: list[int] = Field(
        description="Codebooks at several rates (SNAC): each one's tokens per frame; else empty"
    )
    causal: bool = Field(description="A frame's tokens never depend on later samples")
    streaming: bool = Field(
        description="Served live over the WebSockets /v1/audio/stream/encode and /decode"
    )
    streams: list[AudioStream]


LoadedModelEntry = Annotated[ImageModel | AudioModel, Field(discriminator="modality")]


class Limits(BaseModel):
    """The request limits a client splits its work by, named as their settings."""

    max_items: int = Field(description="Items per request")
    max_body_bytes: int
    max_image_pixels: int = Field(description="Pixels of one image")
    max_audio_seconds: float = Field(description="Seconds of one clip, or of one decoded item")
    max_request_audio_seconds: float = Field(description="Seconds of all items of a request")
    min_audio_sample_rate: int = Field(description="Hz")
    max_decode_tokens: int = Field(description="Token ids in one decode request")


class ModelsResponse(BaseModel):
    models: list[LoadedModelEntry]
    limits: Limits


class LayoutRange(BaseModel):
    name: str = Field(description="text, marker NAME, or MODEL codes")
    start: int
    stop: int = Field(description="One past the last id")


class MediaPlace(BaseModel):
    """Where one model's tokens sit in a layout's sequences (docs/layouts.md)."""

    modality: Literal["image", "audio"]
    begin: int = Field(description="The marker id that opens an item")
    end: int = Field(description="The marker id that closes it")
    offset: int = Field(description="The first id of the codes")
    stride: int = Field(description="Ids per row of the token array")
    rows: int
    shape: list[int] = Field(description="Image: [h, w]")
    end_of_row: int | None
    order: Literal["frame", "codebook", "delay"]
    row_order: list[int]
    pad: int | None
    delay_lead: int


class LayoutEntry(BaseModel):
    name: str
    description: str
    source: str = Field(description="Where the convention comes from")
    vocab_size: int
    text_vocab_size: int
    markers: dict[str, int]
    models: dict[str, MediaPlace]
    ranges: list[LayoutRange] = Field(description="Every id range the layout uses, in order")


class LayoutsResponse(BaseModel):
    layouts: list[LayoutEntry]


Id = Annotated[int, Field(strict=True, ge=0, lt=2**31, description="A token id of the LLM")]


class SequenceRequest(BaseModel):
    """A generated sequence and how to read it."""

    layout: str = Field(description="A loaded layout (GET /v1/layouts)")
    ids: list[Id] = Field(description="The sequence: text ids and media spans, as generated")
    image_format: Literal["png", "webp", "jpeg"] = "png"
    audio_format: Literal["wav", "flac", "ogg"] = "wav"


class SequenceSpan(BaseModel):
    """One span of the sequence, ids ``start`` to ``end - 1``: text, a decoded media item with
    its figures, or a media span's problem."""

    kind: Literal["text", "media"]
    start: int
    end: int
    model: str | None = None
    data: str | None = Field(None, description="The decoded file, base64")
    media_type: str | None = None
    width: int | None = None
    height: int | None = None
    sample_rate: int | None = None
    duration_s: float | None = None
    cached: bool | None = None
    error: ItemProblem | None = None


class SequenceSpanMsgpack(SequenceSpan):
    data: bytes | None = Field(None, description="The decoded file")  # type: ignore[assignment]


class SequenceAnswer(BaseModel):
    layout: str
    spans: list[SequenceSpan]


class SequenceAnswerMsgpack(BaseModel):
    layout: str
    spans: list[SequenceSpanMsgpack]


def span_answers() -> dict[int | str, dict[str, Any]]:
    """200 and 207 of POST /v1/sequences/decode, in JSON or msgpack."""
    content = {
        "application/json": {"schema": ref("SequenceAnswer")},
        MSGPACK: {"schema": ref("SequenceAnswerMsgpack")},
    }
    return {
        200: {"description": "Every media span decoded", "content": content},
        207: {"description": "Some media spans failed: each holds its problem", "content": content},
    }


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    models: list[str] = Field(description="Every loaded model, by name")


class ImagesBase64(BaseModel):
    """An encode body in JSON: each image file in base64, or as a data: URL."""

    images: list[str] = Field(min_length=1, description="Standard base64, or data:...;base64,")


class AudioBase64(BaseModel):
    """An encode body in JSON: each audio file in base64, or as a data: URL."""

    audio: list[str] = Field(min_length=1, description="Standard base64, or data:...;base64,")


class MediaFiles(BaseModel):
    """An encode body in multipart/form-data: one file part per item (any field name)."""

    files: list[bytes] = Field(min_length=1)


class BinaryTokens(BaseModel):
    """One decode item as binary (msgpack bodies only): its ids as raw bytes."""

    dtype: str = Field(description="Any integer NumPy dtype: uint16, <i4, ...; little-endian")
    shape: list[int] = Field(description="[h, w] or [k, F]")
    data: bytes = Field(description="The ids, row-major")


def ref(name: str) -> dict[str, str]:
    """A reference to the document's schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


_BINARY = {"schema": {"type": "string", "format": "binary"}}
# the headers a problem answer carries, by status
_PROBLEM_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    503: {
        "Retry-After": {
            "description": "Seconds to wait before retrying",
            "schema": {"type": "integer"},
        }
    },
}
# what the middleware puts on every HTTP answer, whatever the route or status (app/middleware.py)
ANSWER_HEADERS = {
    "X-Request-Id": {
        "description": "The request's id: the client's X-Request-Id when it is 1 to 128 of "
        "A-Z a-z 0-9 . _ : @ + = / -, else a new one (32 hex digits)",
        "schema": {"type": "string"},
    },
    "Server-Timing": {
        "description": "Milliseconds inside the server: cache, media, queue and forward, those "
        "the request met, then total",
        "schema": {"type": "string"},
    },
}
_MODEL_VERSION = {
    "X-Model-Version": {"description": "The serving model's version", "schema": {"type": "string"}}
}
_WHEN = {
    400: "Empty body, unreadable JSON, msgpack or multipart, bad base64, or bad X-Request-Timeout",
    401: "API key missing or wrong (TOKSERVE_API_KEYS)",
    404: "Unknown model or layout, or none of this modality loaded",
    413: "Body, items, tokens or audio seconds over a limit (GET /v1/models: limits)",
    415: "Not an image or audio file in an accepted format, or truncated",
    422: "The body's structure, a query parameter, or an item's content is not accepted",
    503: "Too many requests in flight, the queue is full, or the server is draining",
    504: "The request's deadline (X-Request-Timeout) passed before its work started",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The problem+json answers a route gives, each with when it is given and its headers
    (401 names the scheme, 503 says when to retry)."""
    return {
        status: {
            "description": _WHEN[status],
            "content": {PROBLEM_JSON: {"schema": ref("Problem")}},
            **({"headers": _PROBLEM_HEADERS[status]} if status in _PROBLEM_HEADERS else {}),
        }
        for status in statuses
    }


def item_answers(
    json_schema: str, msgpack_schema: str, files: tuple[str, ...] = (), npy: bool = False
) -> dict[int | str, dict[str, Any]]:
    """200 and 207 of a multi-item route: the items in JSON or msgpack (Accept picks); a decode
    of one item answers the file itself, an encode may ask for one npy array."""
    lists = {
        "application/json": {"schema": ref(json_schema)},
        MSGPACK: {"schema": ref(msgpack_schema)},
    }
    whole = {media_type: _BINARY for media_type in files}
    return {
        200: {
            "description": "Every item succeeded",
            "headers": _MODEL_VERSION,
            # the files first: a client generator that maps them to bytes takes the first it knows
            "content": {**whole, **lists, **({NPY: _BINARY} if npy else {})},
        },
        207: {
            "description": "Some items failed: each failed slot holds its problem",
            "headers": _MODEL_VERSION,
            "content": lists,
        },
    }


_REQUEST_TIMEOUT = {
    "name": "X-Request-Timeout",
    "in": "header",
    "required": False,
    "description": "Seconds until work must have started (default TOKSERVE_REQUEST_TIMEOUT_S)",
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
}


def encode_body(what: Literal["images", "audio"]) -> dict[str, Any]:
    """openapi_extra of an encode route: the files as the raw body, as multipart parts or as
    base64 JSON; and X-Request-Timeout."""
    return {
        "parameters": [_REQUEST_TIMEOUT],
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": _BINARY,
                "multipart/form-data": {"schema": ref("MediaFiles")},
                "application/json": {"schema": ref(f"{what.capitalize()}Base64")},
            },
        },
    }


def decode_body(modality: Literal["image", "audio"]) -> dict[str, Any]:
    """openapi_extra of a decode route: {model, tokens} in JSON or msgpack (whose items may be
    binary); and X-Request-Timeout. app/api/openapi.py defines the schemas for what is loaded."""
    name = modality.capitalize()
    return {
        "parameters": [_REQUEST_TIMEOUT],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ref(f"{name}DecodeBody")},
                MSGPACK: {"schema": ref(f"{name}DecodeMsgpack")},
            },
        },
    }
