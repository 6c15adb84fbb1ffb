"""The OpenAPI document (/openapi.json): FastAPI's, completed once the models are loaded.

What a request may hold depends on what is served: the model names (enums per modality), the
grid an image decode takes, the codebooks an audio decode takes, the vocabulary. So the
document is built on its first request after the lifespan loaded the models, and kept. A
constraint is stated only where every loaded model of the modality shares it, so that what
the schema allows, the server accepts. Errors are problem+json, declared per route in
app/api/schemas.py: FastAPI's own 422 schema (HTTPValidationError) is never answered.
"""

from __future__ import annotations

import base64
import inspect
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from tokserve_client.layouts import Layout

from app.api import schemas
from app.api.schemas import ANSWER_HEADERS, problems, ref
from app.config import Settings
from app.endpoints import AudioEndpoint, ImageEndpoint
from app.engine import Engine
from app.media import encode_audio, encode_image

H = TypeVar("H", bound=Hashable)
E = TypeVar("E", ImageEndpoint, AudioEndpoint)
REF_PREFIX = "#/components/schemas/"
# (a route's tag, its parameter) -> the schema, of those that depend on what is loaded
LOADED_PARAMETERS = {
    ("images", "model"): "ImageModelName",
    ("audio", "model"): "AudioModelName",
    ("audio", "codebooks"): "Codebooks",
    ("models", "name"): "ModelName",
    ("layouts", "name"): "LayoutName",
    ("images", "layout"): "LayoutName",
    ("audio", "layout"): "LayoutName",
}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
EXAMPLE_SAMPLE_RATE = 16000


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` answer :func:`openapi_document`, kept once the engine exists."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            engine: Engine | None = getattr(app.state, "engine", None)
            document = openapi_document(app, engine)
            if engine is None:  # before the lifespan: no models to name yet
                return document
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def operation_id(route: APIRoute) -> str:
    """A route's operationId: its function's name (encode_images, get_model, ...), which
    generated clients name their calls by."""
    return route.name


def openapi_document(app: FastAPI, engine: Engine | None) -> dict[str, Any]:
    """FastAPI's document with what the routes declare by name filled in from ``engine``'s
    models: the names, the token schemas, realistic examples; and the API key when set."""
    settings: Settings = app.state.settings
    document = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    components = document.setdefault("components", {})
    for operation in _operations(document):
        if _is_fastapi_422(operation):
            del operation["responses"]["422"]
    components["schemas"] = {
        name: schema
        for name, schema in components.get("schemas", {}).items()
        if name not in ("HTTPValidationError", "ValidationError")
    }
    endpoints = list(engine.endpoints.values()) if engine else []
    components["schemas"].update(_loaded_schemas(endpoints, settings.max_items))
    _describe_loaded_parameters(document)
    _add_referenced_models(document)
    _add_media_examples(components["schemas"])
    if engine is not None:
        _describe_layouts(document, engine.registry.layouts, settings.max_items)
    _bound_encode_lists(components["schemas"], settings.max_items)
    if settings.api_keys:
        _require_keys(document, settings.public_metrics)
    _declare_answer_headers(document)
    return document


def _declare_answer_headers(document: dict[str, Any]) -> None:
    """Every answer of every operation declares the headers the middleware adds to all."""
    for operation in _operations(document):
        for response in operation["responses"].values():
            response["headers"] = {**response.get("headers", {}), **ANSWER_HEADERS}


def _operations(document: dict[str, Any]) -> Iterable[dict[str, Any]]:
    return (operation for path in document["paths"].values() for operation in path.values())


def _is_fastapi_422(operation: dict[str, Any]) -> bool:
    content = operation["responses"].get("422", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


def _shared(values: Iterable[H]) -> H | None:
    """The value every loaded model shares, or None when they differ or none is loaded."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def _array(
    items: dict[str, Any], fewest: int | None, most: int | None, description: str
) -> dict[str, Any]:
    bounds = {"minItems": fewest or 1, **({"maxItems": most} if most else {})}
    return {"type": "array", "items": items, **bounds, "description": description}


def _token_id(vocab_sizes: Iterable[int]) -> dict[str, Any]:
    vocab = _shared(vocab_sizes)
    return {"type": "integer", "minimum": 0, **({"maximum": vocab - 1} if vocab else {})}


def _loaded_schemas(
    endpoints: list[ImageEndpoint | AudioEndpoint], max_items: int
) -> dict[str, dict[str, Any]]:
    """The schemas that name what is loaded: model names, token grids and decode bodies."""
    images = [e for e in endpoints if isinstance(e, ImageEndpoint)]
    clips = [e for e in endpoints if isinstance(e, AudioEndpoint)]
    image_id = _token_id(e.info.vocab_size for e in images)
    most = _shared(e.codebooks for e in clips)
    audio_id = _token_id(e.info.vocab_size for e in clips)
    audio_row = _array(audio_id, 1, None, "F token ids, one per frame")
    return {
        "ModelName": _names(endpoints),
        "ImageModelName": _names(images),
        "AudioModelName": _names(clips),
        "Codebooks": {"type": "integer", "minimum": 1, **({"maximum": most} if most else {})},
        "ImageTokenGrid": _image_tokens(images, image_id),
        "AudioTokenCodes": _array(
            audio_row,
            _shared(e.info.rows(e.fewest_codebooks) for e in clips),
            _shared(e.info.rows() for e in clips),
            "[[int]]: the rows of k codebooks (the model's first k; one row each, or each one's "
            "tokens_per_frame rows) of F frames, every row as long",
        ),
        **_decode_bodies("Image", "ImageTokenGrid", max_items, _grid_example(images)),
        **_decode_bodies("Audio", "AudioTokenCodes", max_items, _codes_example(clips)),
    }


def _image_tokens(images: list[ImageEndpoint], image_id: dict[str, Any]) -> dict[str, Any]:
    """An image item: a grid of the models' h rows of w ids, or a sequence of L ids (a model
    whose tokens are one-dimensional); the sides when every loaded model of the kind shares them."""
    grids = [e.grid for e in images if len(e.grid) == 2]
    rows, columns = _shared(tuple(grid) for grid in grids) or (None, None)
    row = _array(image_id, columns, columns, "w token ids")
    grid = _array(row, rows, rows, "[[int]]: the model's h rows of w ids")
    if len(grids) == len(images):
        return grid
    length = _shared(e.grid[0] for e in images if len(e.grid) == 1)
    sequence = _array(image_id, length, length, "[int]: the model's sequence of L ids")
    return sequence if not grids else {"anyOf": [grid, sequence]}


def _names(endpoints: Iterable[ImageEndpoint | AudioEndpoint]) -> dict[str, Any]:
    names = sorted(e.model.name for e in endpoints)
    return {"type": "string", **({"enum": names} if names else {})}


def _decode_bodies(
    modality: str, item: str, max_items: int, example: tuple[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """``{modality}DecodeBody`` (JSON) and ``{modality}DecodeMsgpack``, whose items may also
    be binary: ``tokens`` is one item (answered as the file) or a list (answered as items)."""

    def body(*item_schemas: dict[str, Any]) -> dict[str, Any]:
        one_or_list = [
            schema
            for item_schema in item_schemas
            for schema in (item_schema, _array(item_schema, 1, max_items, "A list of items"))
        ]
        return {
            "type": "object",
            "required": ["tokens"],
            "properties": {
                "model": {
                    "anyOf": [ref(f"{modality}ModelName"), {"type": "null"}],
                    "description": "The model; wins over the query's; default its first",
                },
                "tokens": {
                    "anyOf": one_or_list,
                    "description": "One item (answered as the file) or a list (as items)",
                },
            },
        }

    json_body = body(ref(item))
    if example is not None:
        model, tokens = example
        json_body["examples"] = [
            {"model": model, "tokens": tokens},
            {"model": model, "tokens": [tokens, tokens]},
        ]
    return {
        f"{modality}DecodeBody": json_body,
        f"{modality}DecodeMsgpack": body(ref(item), ref("BinaryTokens")),
    }


def _pattern(shape: tuple[int, int], vocab_size: int) -> list[list[int]]:
    rows, columns = shape
    return (np.arange(rows * columns).reshape(rows, columns) * 7 % vocab_size).tolist()


def _grid_example(images: list[ImageEndpoint]) -> tuple[str, Any] | None:
    first = _first_decodable(images)
    if first is None:
        return None
    if len(first.grid) == 1:  # a sequence
        return first.model.name, _pattern((1, first.grid[0]), first.info.vocab_size)[0]
    return first.model.name, _pattern((first.grid[0], first.grid[1]), first.info.vocab_size)


def _codes_example(clips: list[AudioEndpoint]) -> tuple[str, Any] | None:
    first = _first_decodable(clips)
    if first is None:
        return None
    frames = max(1, round(first.info.frame_rate / 10))  # a tenth of a second
    return first.model.name, _pattern((first.codebooks, frames), first.info.vocab_size)


def _first_decodable(endpoints: list[E]) -> E | None:
    return next((e for e in endpoints if not e.info.encode_only), None)


def _describe_loaded_parameters(document: dict[str, Any]) -> None:
    """A route's model parameter lists the loaded models of its modality; ``codebooks`` is
    bounded by theirs."""
    for operation in _operations(document):
        tag = operation.get("tags", [""])[0]
        for parameter in operation.get("parameters", []):
            name = LOADED_PARAMETERS.get((tag, parameter["name"]))
            if name is not None:
                parameter["schema"] = ref(name)


def _models_of(module: object) -> dict[str, type[BaseModel]]:
    return {
        name: value
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, BaseModel) and value is not BaseModel
    }


def _add_referenced_models(document: dict[str, Any]) -> None:
    """Add the app.api.schemas models that the routes' declarations name but FastAPI did not
    put in the document (it adds only response_model's)."""
    known = document["components"]["schemas"]
    models = _models_of(schemas)
    missing = sorted({name for name in _references(document) if name not in known} & set(models))
    if not missing:
        return
    _, defs = models_json_schema(
        [(models[name], "validation") for name in missing], ref_template=REF_PREFIX + "{model}"
    )
    for name, schema in defs.get("$defs", {}).items():
        known.setdefault(name, schema)


def _references(node: Any) -> set[str]:
    """Every schema name ``node`` refers to, at any depth."""
    if isinstance(node, list):
        return set().union(*map(_references, node))
    if not isinstance(node, dict):
        return set()
    own = node.get("$ref")
    found = {own.removeprefix(REF_PREFIX)} if isinstance(own, str) else set()
    return found.union(*map(_references, node.values()))


def _describe_layouts(
    document: dict[str, Any], layouts: Mapping[str, Layout], max_items: int
) -> None:
    """The loaded layouts' names as an enum, a generated sequence of the first layout (text,
    one media span of its first model, text) as the example of a sequence decode body, and
    spans of its ids as what a decode route takes in place of tokens."""
    known = document["components"]["schemas"]
    names = sorted(layouts)
    known["LayoutName"] = {"type": "string", **({"enum": names} if names else {})}
    known["SequenceRequest"]["properties"]["layout"] = ref("LayoutName")
    if not names:
        return
    layout = layouts[names[0]]
    place = next(iter(layout.media.values()))
    shape = place.shape if place.modality == "image" else (place.rows, 2)
    span = layout.to_ids(place.model, np.zeros(shape, dtype=np.int64)).tolist()
    known["SequenceRequest"]["examples"] = [{"layout": names[0], "ids": [1, 2, *span, 3]}]
    for modality in ("Image", "Audio"):
        known[f"{modality}DecodeIds"] = _span_body(modality, layout.vocab_size, max_items)
        route = document["paths"][f"/v1/{'images' if modality == 'Image' else 'audio'}/decode"]
        for content in route["post"]["requestBody"]["content"].values():
            tokens_body = content["schema"]
            content["schema"] = {"oneOf": [tokens_body, ref(f"{modality}DecodeIds")]}


def _span_body(modality: str, vocab_size: int, max_items: int) -> dict[str, Any]:
    """A decode body of spans of a layout's ids (each as ``?layout=`` encode answers it)."""
    span = _array(_token_id([vocab_size]), 1, None, "One span of the layout's ids")
    return {
        "type": "object",
        "required": ["layout", "ids"],
        "properties": {
            "layout": ref("LayoutName"),
            "model": {
                "anyOf": [ref(f"{modality}ModelName"), {"type": "null"}],
                "description": "The model; default the one whose marker opens the first span",
            },
            "ids": {
                "anyOf": [span, _array(span, 1, max_items, "A list of spans")],
                "description": "One span (answered as the file) or a list (as items)",
            },
        },
        "additionalProperties": False,  # with tokens, it is a body of tokens
    }


def _add_media_examples(known: dict[str, dict[str, Any]]) -> None:
    """Real files as examples of the base64 encode bodies: a small PNG and a short WAV."""
    pixels = np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)
    seconds = torch.arange(EXAMPLE_SAMPLE_RATE // 5) / EXAMPLE_SAMPLE_RATE
    wave = 0.3 * torch.sin(2 * torch.pi * 440 * seconds)[None]
    png = base64.b64encode(encode_image(pixels, "png")).decode()
    wav = base64.b64encode(encode_audio(wave, EXAMPLE_SAMPLE_RATE, "wav")).decode()
    known["ImagesBase64"]["examples"] = [{"images": [png]}, {"images": [png, png]}]
    known["AudioBase64"]["examples"] = [{"audio": [wav]}]


def _bound_encode_lists(known: dict[str, dict[str, Any]], max_items: int) -> None:
    """An encode body's files, in JSON or multipart, are at most MAX_ITEMS (more answer 413)."""
    for schema, files in (
        ("ImagesBase64", "images"),
        ("AudioBase64", "audio"),
        ("MediaFiles", "files"),
    ):
        known[schema]["properties"][files]["maxItems"] = max_items


def _require_keys(document: dict[str, Any], public_metrics: bool) -> None:
    """With API keys set: every /v1 route (and /metrics unless public) names them and may
    answer 401."""
    document["components"]["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in document["paths"].items():
        if not path.startswith("/v1/") and (path != "/metrics" or public_metrics):
            continue
        for operation in operations.values():
            operation["security"] = [{scheme: []} for scheme in SECURITY_SCHEMES]
            operation["responses"].update({"401": problems(401)[401]})
