"""LLM sequence layouts: media tokens in one flat id space with text, and back.

The server lays tokens out and takes sequences apart with this very module; a client does the
same offline from a layout file and the models' figures (GET /v1/models entries).

A multimodal LLM reads one sequence of ids from one vocabulary: text ids, a marker that opens
an image or a clip, the media's codes shifted past the text vocabulary (per row of the token
array for audio), markers inside (end of row), a closing marker. A layout (a JSON file in
``layouts/``) declares all of it for the models it covers; ``Layout.to_ids`` lays one item's
tokens out, ``Layout.from_ids`` takes one span back, and ``Layout.split`` cuts a generated
sequence into text and media spans, each media span with its tokens or its problem.

Every id range a layout declares (the text vocabulary, each marker, each model's code range)
is checked at load to lie inside its vocabulary and to overlap no other: an id means one thing.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

log = logging.getLogger("tokserve.layouts")
Order = Literal["frame", "codebook", "delay"]
ORDERS: tuple[Order, ...] = ("frame", "codebook", "delay")


class LayoutError(ValueError):
    """A layout file that cannot be used; the message is one sentence naming the file."""


@dataclass(frozen=True)
class MediaLayout:
    """How one model's tokens sit in the sequence.

    Image grids go row by row, ``end_of_row`` after each row when set. Audio token arrays
    [rows, F] go frame by frame (``frame``: each frame's rows in ``row_order``), codebook by
    codebook (``codebook``), or in MusicGen's delay pattern (``delay``: row r starts r steps
    after ``delay_lead`` steps of pads, ``pad`` fills the gaps). The code at position p of a
    frame (or row p) is ``offset + p * stride + id``: each row has its own range of ``stride``.
    """

    model: str
    modality: Literal["image", "audio"]
    begin: int
    end: int
    offset: int
    stride: int
    rows: int  # rows of the token array (image: 1 range for the whole grid)
    shape: tuple[int, ...] = ()  # image: (h, w), or (L,) for a sequence
    end_of_row: int | None = None
    order: Order = "frame"
    row_order: tuple[int, ...] = ()
    pad: int | None = None
    delay_lead: int = 0  # delay order: all-pad steps before codebook 0's first frame

    @property
    def code_range(self) -> range:
        """Every id the codes may take."""
        return range(self.offset, self.offset + self.rows * self.stride)

    def to_ids(self, tokens: np.ndarray) -> np.ndarray:
        """One item's token array -> its span, markers included."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.modality == "image":
            body = tokens + self.offset
            if self.end_of_row is not None:
                eol = np.full((body.shape[0], 1), self.end_of_row, dtype=np.int64)
                body = np.concatenate([body, eol], axis=1)
            codes = body.reshape(-1)
        else:
            codes = self._audio_ids(tokens)
        return np.concatenate([[self.begin], codes, [self.end]]).astype(np.int64)

    def _audio_ids(self, tokens: np.ndarray) -> np.ndarray:
        rows, frames = tokens.shape  # the first rows only, for an encode of fewer codebooks
        order = [row for row in (self.row_order or range(self.rows)) if row < rows]
        positions = np.arange(rows)[:, None] * self.stride + self.offset
        if self.order == "codebook":
            return (tokens + positions).reshape(-1)
        shifted = tokens[order] + positions
        if self.order == "frame":
            return shifted.T.reshape(-1)
        assert self.pad is not None  # a delay layout has one: checked at load
        lead = self.delay_lead
        steps = np.full((lead + frames + rows - 1, rows), self.pad, dtype=np.int64)
        for row in range(rows):
            steps[lead + row : lead + row + frames, row] = shifted[row]
        return steps.reshape(-1)

    def from_ids(self, ids: Sequence[int], first: int = 0) -> np.ndarray:
        """A span's ids (markers included or not) -> the token array; ValueError saying what
        is wrong and where (positions count from ``first``, the position of ``ids[0]``): a
        code out of its range, a ragged grid, a misplaced end of row or pad."""
        codes = np.asarray(list(ids), dtype=np.int64)
        if codes.size and codes[0] == self.begin:
            codes, first = codes[1:], first + 1
        if codes.size and codes[-1] == self.end:
            codes = codes[:-1]
        if self.modality == "image":
            return self._image_tokens(codes, first)
        return self._audio_tokens(codes, first)

    def _image_tokens(self, codes: np.ndarray, first: int) -> np.ndarray:
        if len(self.shape) == 1:  # a sequence of ids, no rows
            (length,) = self.shape
            if codes.size != length:
                raise ValueError(f"a sequence of {length} ids is {length} ids, not {codes.size}")
            self._check(codes, np.full(codes.size, self.offset), first + np.arange(codes.size))
            return codes - self.offset
        height, width = self.shape
        columns = width + (self.end_of_row is not None)
        if codes.size != height * columns:
            raise ValueError(
                f"a {height} x {width} grid is {height * columns} ids here, not {codes.size}"
            )
        if self.end_of_row is not None:
            ends = np.flatnonzero(codes == self.end_of_row)
            expected = np.arange(1, height + 1) * columns - 1
            if not np.array_equal(ends, expected):
                at = first + int(np.setxor1d(ends, expected)[0])
                raise ValueError(
                    f"a {height} x {width} grid ends each row of {width} codes with the end of "
                    f"row marker; position {at} breaks that"
                )
            codes = np.delete(codes, expected)
            first_of = first + np.flatnonzero(np.arange(height * columns) % columns != width)
        else:
            first_of = first + np.arange(codes.size)
        self._check(codes, np.full(codes.size, self.offset), first_of)
        return (codes - self.offset).reshape(height, width)

    def _audio_tokens(self, codes: np.ndarray, first: int) -> np.ndarray:
        rows = self.rows
        where = first + np.arange(codes.size)
        if self.order == "delay":
            lead = self.delay_lead
            if codes.size % rows or codes.size // rows < lead + rows:
                raise ValueError(
                    f"a delay pattern of {rows} rows is whole steps of {rows} ids, at least "
                    f"{lead + rows} steps; this span has {codes.size} ids"
                )
            steps, places = codes.reshape(-1, rows), where.reshape(-1, rows)
            frames = steps.shape[0] - rows + 1 - lead
            gap = np.ones_like(steps, dtype=bool)
            for row in range(rows):
                gap[lead + row : lead + row + frames, row] = False
            if np.any(steps[gap] != self.pad):
                at = int(places[gap][np.flatnonzero(steps[gap] != self.pad)[0]])
                raise ValueError(f"position {at} lies in the delay pattern's gap: only pad fits")
            shifted = np.stack([steps[lead + r : lead + r + frames, r] for r in range(rows)])
            shifted_at = np.stack([places[lead + r : lead + r + frames, r] for r in range(rows)])
        else:
            if codes.size == 0 or codes.size % rows:
                raise ValueError(f"{codes.size} codes are not whole frames of {rows} rows")
            if self.order == "codebook":
                shifted, shifted_at = codes.reshape(rows, -1), where.reshape(rows, -1)
            else:
                shifted, shifted_at = codes.reshape(-1, rows).T, where.reshape(-1, rows).T
        low = np.arange(rows)[:, None] * self.stride + self.offset
        self._check(
            shifted.ravel(), np.broadcast_to(low, shifted.shape).ravel(), shifted_at.ravel()
        )
        tokens = shifted - low
        if self.order == "codebook" or not self.row_order:
            return tokens
        restored = np.empty_like(tokens)
        restored[list(self.row_order)] = tokens
        return restored

    def _check(self, codes: np.ndarray, low: np.ndarray, where: np.ndarray) -> None:
        """Each code within ``stride`` ids from its ``low``; ValueError naming the first not."""
        bad = np.flatnonzero((codes < low) | (codes >= low + self.stride))
        if bad.size:
            i = bad[np.argmin(where[bad])]
            raise ValueError(
                f"id {codes[i]} at position {where[i]} is not one of {self.model}'s codes: "
                f"that place takes {low[i]} to {low[i] + self.stride - 1}"
            )


@dataclass(frozen=True)
class Span:
    """One span of a generated sequence: text ids, or a model's media with its tokens or the
    problem that keeps them from decoding; ``start``/``end`` index the sequence."""

    kind: Literal["text", "media"]
    start: int
    end: int
    model: str | None = None
    tokens: np.ndarray | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Layout:
    """One layout file: the vocabulary, the markers and how each covered model's tokens sit."""

    name: str
    vocab_size: int
    text_vocab_size: int
    markers: Mapping[str, int]
    media: Mapping[str, MediaLayout]
    source: str = ""
    description: str = ""
    ranges: list[IdRange] = field(default_factory=list)

    def to_ids(self, model: str, tokens: np.ndarray) -> np.ndarray:
        """One item's token array -> its span of ids."""
        return self.media[model].to_ids(tokens)

    def from_ids(self, model: str, ids: Sequence[int]) -> np.ndarray:
        """One span of ids -> the model's token array (ValueError saying what is wrong)."""
        return self.media[model].from_ids(ids)

    def split(self, ids: Sequence[int]) -> list[Span]:
        """A generated sequence -> its text and media spans in order; a media span that does
        not close, or does not decode, carries its problem."""
        opens = {media.begin: media for media in self.media.values()}
        sequence = [int(i) for i in ids]
        spans: list[Span] = []
        text_start = 0
        position = 0
        while position < len(sequence):
            media = opens.get(sequence[position])
            if media is None:
                position += 1
                continue
            if text_start < position:
                spans.append(Span("text", text_start, position))
            closing = _next(sequence, media.end, position + 1)
            interrupt = _next_of(sequence, opens, position + 1)
            if closing is None or (interrupt is not None and interrupt < closing):
                stop = interrupt if interrupt is not None else len(sequence)
                spans.append(
                    Span(
                        "media",
                        position,
                        stop,
                        media.model,
                        problem=f"the {media.model} span opened at {position} is not closed "
                        f"before {'the next media span' if interrupt is not None else 'the end'}",
                    )
                )
                position = text_start = stop
                continue
            try:
                tokens = media.from_ids(sequence[position + 1 : closing], position + 1)
                spans.append(Span("media", position, closing + 1, media.model, tokens))
            except ValueError as exc:
                spans.append(Span("media", position, closing + 1, media.model, problem=str(exc)))
            position = text_start = closing + 1
        if text_start < len(sequence):
            spans.append(Span("text", text_start, len(sequence)))
        return spans


def _next(sequence: list[int], value: int, start: int) -> int | None:
    try:
        return sequence.index(value, start)
    except ValueError:
        return None


def _next_of(sequence: list[int], values: Mapping[int, Any], start: int) -> int | None:
    return next((i for i in range(start, len(sequence)) if sequence[i] in values), None)


Figures = Mapping[str, Any]  # a model's GET /v1/models entry


def load_layout(path: Path, models: Mapping[str, Figures]) -> Layout:
    """One layout file, checked against the models it names (their GET /v1/models entries, by
    name); LayoutError otherwise."""
    try:
        spec = json.loads(path.read_text())
        return _build(spec, path.stem, models)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, LayoutError):
            raise
        raise LayoutError(f"layout {path.name}: {exc}") from exc


def _build(spec: dict[str, Any], name: str, models: Mapping[str, Figures]) -> Layout:
    markers = {str(k): int(v) for k, v in spec.get("markers", {}).items()}
    media: dict[str, MediaLayout] = {}
    for model, entry in spec.get("models", {}).items():
        info = models.get(model)
        if info is None:
            raise LayoutError(
                f"layout {name}: model {model!r} is not loaded (loaded: {sorted(models)})"
            )
        media[model] = _media(name, model, entry, info, markers)
    layout = Layout(
        name=str(spec.get("name", name)),
        vocab_size=int(spec["vocab_size"]),
        text_vocab_size=int(spec["text_vocab_size"]),
        markers=markers,
        media=media,
        source=str(spec.get("source", "")),
        description=str(spec.get("description", "")),
    )
    object.__setattr__(layout, "ranges", _check_ranges(layout))
    return layout


def _media(
    layout: str, model: str, entry: dict[str, Any], info: Figures, markers: dict[str, int]
) -> MediaLayout:
    def marker(key: str) -> int | None:
        if entry.get(key) is None:
            return None
        label = str(entry[key])
        if label not in markers:
            raise LayoutError(f"layout {layout}: {model}'s {key} names no marker {label!r}")
        return markers[label]

    begin, end = marker("begin"), marker("end")
    if begin is None or end is None:
        raise LayoutError(f"layout {layout}: {model} needs a begin and an end marker")
    order = entry.get("order", "frame")
    if order not in ORDERS:
        raise LayoutError(f"layout {layout}: {model}'s order must be one of {ORDERS}")
    vocab_size = int(info["vocab_size"])
    stride = int(entry.get("stride", vocab_size))
    if stride < vocab_size:
        raise LayoutError(
            f"layout {layout}: {model}'s stride {stride} is below its vocabulary {vocab_size}"
        )
    if info["modality"] == "audio":
        rows = sum(info.get("tokens_per_frame") or []) or int(info["codebooks"])
        row_order = tuple(int(r) for r in entry.get("row_order", ()))
        if row_order and sorted(row_order) != list(range(rows)):
            raise LayoutError(
                f"layout {layout}: {model}'s row_order must order its {rows} rows 0..{rows - 1}"
            )
        pad = marker("pad")
        if order == "delay" and pad is None:
            raise LayoutError(f"layout {layout}: {model}'s delay order needs a pad marker")
        return MediaLayout(
            model, "audio", begin, end, int(entry["offset"]), stride, rows,
            order=order, row_order=row_order, pad=pad, delay_lead=int(entry.get("delay_lead", 0)),
        )  # fmt: skip
    shape, end_of_row = tuple(int(n) for n in info["grid"]), marker("end_of_row")
    if end_of_row is not None and len(shape) != 2:
        raise LayoutError(f"layout {layout}: {model}'s tokens are a sequence, with no row to end")
    return MediaLayout(
        model, "image", begin, end, int(entry["offset"]), stride, 1,
        shape=shape, end_of_row=end_of_row,
    )  # fmt: skip


class IdRange(NamedTuple):
    """Ids ``start`` to ``stop - 1``, and what they mean."""

    name: str
    start: int
    stop: int


def _check_ranges(layout: Layout) -> list[IdRange]:
    """Every range of ids the layout uses, in order; LayoutError if two overlap or one leaves
    the vocabulary."""
    ranges = [IdRange("text", 0, layout.text_vocab_size)]
    ranges += [IdRange(f"marker {k}", v, v + 1) for k, v in layout.markers.items()]
    ranges += [
        IdRange(f"{m.model} codes", m.code_range.start, m.code_range.stop)
        for m in layout.media.values()
    ]
    ranges.sort(key=lambda r: (r.start, r.stop))
    for first, second in itertools.pairwise(ranges):
        if second.start < first.stop:
            raise LayoutError(
                f"layout {layout.name}: {first.name} [{first.start}, {first.stop}) and "
                f"{second.name} [{second.start}, {second.stop}) overlap"
            )
    if ranges[0].start < 0 or ranges[-1].stop > layout.vocab_size:
        last = ranges[-1] if ranges[-1].stop > layout.vocab_size else ranges[0]
        raise LayoutError(
            f"layout {layout.name}: {last.name} [{last.start}, {last.stop}) is outside its "
            f"vocabulary of {layout.vocab_size} ids"
        )
    return ranges


def load_layouts(folder: Path, models: Mapping[str, Figures]) -> dict[str, Layout]:
    """Every ``*.json`` layout in ``folder`` whose models are all loaded; one naming a model
    that is not loaded (a preset for a checkpoint this server does not serve) is skipped and
    logged, a bad one is a LayoutError."""
    layouts = {}
    for path in sorted(folder.glob("*.json")):
        try:
            wanted = set(json.loads(path.read_text()).get("models", {}))
        except (OSError, json.JSONDecodeError) as exc:
            raise LayoutError(f"layout {path.name}: {exc}") from exc
        if not wanted <= set(models):
            log.info(
                "layout %s skipped: it covers %s, not loaded",
                path.name,
                sorted(wanted - set(models)),
            )
            continue
        layout = load_layout(path, models)
        layouts[layout.name] = layout
    return layouts
