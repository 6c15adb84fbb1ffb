"""/openapi.json describes what is loaded: model names per modality, the token shapes a
decode takes where every loaded model agrees on them, and the API key when one is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.support import TINY_IMAGE, served, settings_for, tiny_repo, write_model


async def document_of(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json", headers={"X-API-Key": "s3cret"})
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def parameter(document: dict[str, Any], path: str, name: str) -> dict[str, Any]:
    operation = next(iter(document["paths"][path].values()))
    found: dict[str, Any] = next(p for p in operation["parameters"] if p["name"] == name)
    return found


async def test_model_parameters_list_the_loaded_models_of_the_routes_modality(
    client: httpx.AsyncClient,
) -> None:
    document = await document_of(client)
    schemas = document["components"]["schemas"]
    assert parameter(document, "/v1/images/encode", "model")["schema"]["$ref"].endswith(
        "/ImageModelName"
    )
    assert parameter(document, "/v1/audio/decode", "model")["schema"]["$ref"].endswith(
        "/AudioModelName"
    )
    assert schemas["ImageModelName"]["enum"] == ["tiny-image"]
    assert schemas["AudioModelName"]["enum"] == ["tiny-audio"]
    assert schemas["ModelName"]["enum"] == ["tiny-audio", "tiny-image"]
    assert schemas["Codebooks"] == {"type": "integer", "minimum": 1, "maximum": 4}


async def test_a_decode_body_takes_the_loaded_models_grid_and_vocabulary(
    client: httpx.AsyncClient,
) -> None:
    schemas = (await document_of(client))["components"]["schemas"]
    grid = schemas["ImageTokenGrid"]
    assert (grid["minItems"], grid["maxItems"]) == (8, 8)
    assert (grid["items"]["minItems"], grid["items"]["maxItems"]) == (8, 8)
    assert grid["items"]["items"] == {"type": "integer", "minimum": 0, "maximum": 999}
    codes = schemas["AudioTokenCodes"]
    assert (codes["minItems"], codes["maxItems"], codes["items"]["minItems"]) == (1, 4, 1)
    one, several = schemas["ImageDecodeBody"]["properties"]["tokens"]["anyOf"]
    assert one["$ref"].endswith("/ImageTokenGrid") and several["items"] == one
    assert several["maxItems"] == 64  # TOKSERVE_MAX_ITEMS


async def test_encode_bodies_take_at_most_max_items_files(repo: Path) -> None:
    async with served(settings_for(repo, max_items=3)) as client:
        schemas = (await document_of(client))["components"]["schemas"]
    assert schemas["ImagesBase64"]["properties"]["images"]["maxItems"] == 3
    assert schemas["AudioBase64"]["properties"]["audio"]["maxItems"] == 3
    assert schemas["MediaFiles"]["properties"]["files"]["maxItems"] == 3


async def test_shapes_that_loaded_models_differ_on_are_left_open(tmp_path: Path) -> None:
    repo = tiny_repo(tmp_path)
    smaller = {**TINY_IMAGE, "name": "tiny-image-32"}
    write_model(repo, {**smaller, "arch": {**TINY_IMAGE["arch"], "image_size": 32}})
    async with served(settings_for(repo)) as client:
        schemas = (await document_of(client))["components"]["schemas"]
    assert schemas["ImageModelName"]["enum"] == ["tiny-image", "tiny-image-32"]
    grid = schemas["ImageTokenGrid"]
    assert "maxItems" not in grid and "maxItems" not in grid["items"]
    assert grid["items"]["items"]["maximum"] == 999  # the vocabulary they share


async def test_with_api_keys_every_v1_route_names_them_and_answers_401(repo: Path) -> None:
    async with served(settings_for(repo, api_keys=["s3cret"])) as client:
        document = await document_of(client)
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            keyed = path.startswith("/v1/") or path == "/metrics"
            assert ("401" in operation["responses"]) == keyed, path
            assert ("security" in operation) == keyed, path


async def test_without_api_keys_no_route_answers_401(client: httpx.AsyncClient) -> None:
    document = await document_of(client)
    assert "securitySchemes" not in document["components"]
    assert not any(
        "401" in op["responses"] for ops in document["paths"].values() for op in ops.values()
    )


async def test_every_answer_declares_the_request_id_and_server_timing_headers(repo: Path) -> None:
    async with served(settings_for(repo, api_keys=["s3cret"])) as client:
        document = await document_of(client)
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                assert {"X-Request-Id", "Server-Timing"} <= set(response["headers"]), (path, status)
    answers_401 = document["paths"]["/v1/images/encode"]["post"]["responses"]["401"]
    assert set(answers_401["headers"]) == {"WWW-Authenticate", "X-Request-Id", "Server-Timing"}
