"""Response models and request-body descriptions for the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Problem(BaseModel):
    status: int
    title: str
    detail: str = Field(description="What was wrong with this item and what is accepted")


class ItemFailure(BaseModel):
    """A failed item's slot in a multi-item answer (status 207, or the request's own)."""

    error: Problem


class ImageTokens(BaseModel):
    tokens: list[list[int]] = Field(description="Token ids, h rows of w")
    shape: list[int] = Field(description="[h, w]")
    source_size: list[int] | None = Field(
        None, description="[width, height] of the upright source image; null if unreadable"
    )
    crop_box: list[float] | None = Field(
        None, description="[left, top, right, bottom] of the source the tokens cover, its pixels"
    )
    content_box: list[int] | None = Field(
        None, description="[left, top, right, bottom] the source fills in the model's image"
    )
    cached: bool = Field(description="Answered from the token cache")


class ImageEncodeResponse(BaseModel):
    model: str
    version: str = Field(description="Hash of the model's config and weights")
    items: list[ImageTokens | ItemFailure]


class AudioTokens(BaseModel):
    tokens: list[list[int]] = Field(description="Token ids, K codebooks of F frames")
    shape: list[int] = Field(description="[K, F]")
    codebooks: int
    frames: int
    frame_rate: float = Field(description="Frames per second")
    sample_rate: int = Field(description="The model's sample rate, Hz")
    duration_s: float = Field(description="Audio covered by the tokens: frames / frame_rate")
    source_sample_rate: int | None = Field(None, description="The file's rate, Hz, as declared")
    source_channels: int | None = Field(None, description="The file's channels (mixed as needed)")
    samples: int | None = Field(None, description="The file's samples per channel, as declared")
    cached: bool


class AudioEncodeResponse(BaseModel):
    model: str
    version: str
    items: list[AudioTokens | ItemFailure]


class DecodedItem(BaseModel):
    data: str = Field(description="The file, base64 (raw bytes in msgpack)")
    media_type: str
    cached: bool


class DecodedItems(BaseModel):
    model: str
    version: str
    items: list[DecodedItem | ItemFailure]


class ModelsResponse(BaseModel):
    models: list[dict[str, Any]]
    limits: dict[str, float] = Field(description="Request limits, named as in the settings")


def ENCODE_BODY(what: str) -> dict[str, Any]:
    """OpenAPI request body of an encode route: raw file, multipart files, or base64 JSON."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            }
                        },
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": [what],
                        "properties": {what: {"type": "array", "items": {"type": "string"}}},
                    }
                },
            },
        }
    }


def DECODE_BODY(layout: str) -> dict[str, Any]:
    """OpenAPI request body of a decode route: JSON or msgpack {model, tokens}."""
    schema = {
        "type": "object",
        "required": ["tokens"],
        "properties": {
            "model": {"type": "string"},
            "tokens": {"type": "array", "description": f"{layout}, or a list of those"},
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "application/msgpack": {}},
        }
    }
