"""What a bulk job reads: its inputs as a deterministic stream of items, and each item's bytes.

An input is a folder (searched recursively for the modality's file extensions), a glob pattern,
a text file of paths (one per line), a Parquet or JSONL file with a column of paths or bytes, or
a WebDataset tar. ``plan`` lists every item once, in the same order on every run: an item's
``Locator`` says where its bytes are, small enough to send to a Ray worker, and ``read`` fetches
them (from any thread or process that sees the same files).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from app.errors import BadRequest, ProblemError

Modality = Literal["image", "audio"]
EXTENSIONS: dict[str, frozenset[str]] = {
    "image": frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}),
    "audio": frozenset(
        {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".m4a", ".mp4", ".mov"}
        | {".webm", ".mka", ".mkv"}
    ),
}
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
TABLE_SUFFIXES = frozenset({".parquet", ".jsonl", ".ndjson"})
GLOB_CHARS = frozenset("*?[")


class Locator(NamedTuple):
    """Where one item's bytes are: a file; a tar member (offset, size); row ``row`` of a Parquet
    row group ``group`` or the JSONL line starting at byte ``group``, in ``column``."""

    kind: Literal["file", "tar", "parquet", "jsonl"]
    path: str
    group: int = 0
    row: int = 0
    column: str = ""


@dataclass(frozen=True, slots=True)
class Item:
    """One item of the plan: its place in the job, its id in the output, and its bytes' place."""

    index: int
    id: str
    locator: Locator


class InputError(ValueError):
    """An input that cannot be planned: missing, of an unknown kind, or without the column."""


@dataclass(frozen=True)
class Inputs:
    """The job's inputs and how to read them; ``plan()`` enumerates their items."""

    paths: Sequence[str]
    modality: Modality
    column: str = "path"
    id_column: str | None = None

    def plan(self) -> Iterator[Item]:
        """Every item of every input, inputs in the order given, each input's items sorted."""
        index = 0
        for spec in self.paths:
            for item_id, locator in self._items(spec):
                yield Item(index, item_id, locator)
                index += 1

    def _items(self, spec: str) -> Iterator[tuple[str, Locator]]:
        path = Path(spec)
        if path.is_dir():
            yield from _folder(path, EXTENSIONS[self.modality])
        elif GLOB_CHARS & set(spec):
            yield from _glob(spec, EXTENSIONS[self.modality])
        elif not path.exists():
            raise InputError(f"{spec}: no such file or folder.")
        elif path.suffix == ".tar":
            yield from _tar(path, EXTENSIONS[self.modality])
        elif path.suffix in LIST_SUFFIXES:
            yield from _path_list(path)
        elif path.suffix == ".parquet":
            yield from _parquet(path, self.column, self.id_column)
        elif path.suffix in TABLE_SUFFIXES:
            yield from _jsonl(path, self.column, self.id_column)
        elif path.suffix.lower() in EXTENSIONS[self.modality]:
            yield path.name, Locator("file", str(path))
        else:
            raise InputError(
                f"{spec}: not a folder, glob, {self.modality} file, list of paths "
                f"({', '.join(sorted(LIST_SUFFIXES))}), Parquet, JSONL or WebDataset .tar."
            )


def plan_digest(items: Iterator[Item]) -> tuple[int, str]:
    """How many items a plan holds and a sha256 of their ids and locators: a resumed job must
    see the same inputs as the run it continues."""
    digest = hashlib.sha256()
    count = 0
    for item in items:
        digest.update(json.dumps([item.id, *item.locator]).encode())
        count += 1
    return count, digest.hexdigest()


def _folder(root: Path, extensions: frozenset[str]) -> Iterator[tuple[str, Locator]]:
    found = []
    for folder, _, names in os.walk(root):
        found += [Path(folder, n) for n in names if Path(n).suffix.lower() in extensions]
    for path in sorted(found):
        yield path.relative_to(root).as_posix(), Locator("file", str(path))


def _glob(pattern: str, extensions: frozenset[str]) -> Iterator[tuple[str, Locator]]:
    """Matches of ``pattern`` with the modality's extensions; ids relative to the pattern's
    leading folders (``data/**/*.jpg`` names ``a/b.jpg`` for ``data/a/b.jpg``)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if GLOB_CHARS & set(part)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path()
    matches = sorted(
        Path(p)
        for p in glob.glob(pattern, recursive=True)
        if Path(p).is_file() and Path(p).suffix.lower() in extensions
    )
    for path in matches:
        yield path.relative_to(root).as_posix(), Locator("file", str(path))


def _path_list(listing: Path) -> Iterator[tuple[str, Locator]]:
    """One path per line (blank lines and # comments skipped), relative to the list's folder."""
    with listing.open(encoding="utf-8") as lines:
        for line in lines:
            name = line.strip()
            if name and not name.startswith("#"):
                yield name, Locator("file", str(listing.parent / name))


def _tar(archive: Path, extensions: frozenset[str]) -> Iterator[tuple[str, Locator]]:
    """A WebDataset tar: each sample's first member with the modality's extension, id = key."""
    seen: set[str] = set()
    with tarfile.open(archive) as tar:
        for member in tar:
            name = Path(member.name)
            key = (name.parent / name.name.split(".", 1)[0]).as_posix()
            if member.isfile() and name.suffix.lower() in extensions and key not in seen:
                seen.add(key)
                locator = Locator("tar", str(archive), member.offset_data, member.size)
                yield key, locator


def _parquet(table: Path, column: str, id_column: str | None) -> Iterator[tuple[str, Locator]]:
    """Rows of a Parquet file; reads only the id column (or none) to plan."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(table)
    names = parquet.schema_arrow.names
    for wanted in (column, id_column):
        if wanted is not None and wanted not in names:
            raise InputError(f"{table}: no column {wanted!r}; it has {', '.join(names)}.")
    offset = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        ids = (
            parquet.read_row_group(group, columns=[id_column]).column(0).to_pylist()
            if id_column
            else [f"{table.name}#{offset + row}" for row in range(rows)]
        )
        for row, item_id in enumerate(ids):
            yield str(item_id), Locator("parquet", str(table), group, row, column)
        offset += rows


def _jsonl(table: Path, column: str, id_column: str | None) -> Iterator[tuple[str, Locator]]:
    """Lines of a JSONL file: each names its line's byte offset, to be read again later."""
    with table.open("rb") as lines:
        offset = 0
        for number, line in enumerate(lines):
            if line.strip():
                record = _json_record(line, table, number)
                if column not in record:
                    raise InputError(f"{table}: line {number + 1} has no {column!r} field.")
                item_id = record.get(id_column) if id_column else f"{table.name}#{number}"
                yield str(item_id), Locator("jsonl", str(table), offset, number, column)
            offset += len(line)


def _json_record(line: bytes, table: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise InputError(f"{table}: line {number + 1} is not JSON ({exc}).") from None
    if not isinstance(record, dict):
        raise InputError(f"{table}: line {number + 1} is not a JSON object.")
    return record


class Reader:
    """Reads items' bytes; thread-safe. Parquet row groups are read whole and the last one of
    each file is kept, so reading a file's rows in order reads each group once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[str, tuple[tuple[int, str], list[Any]]] = {}

    def read(self, locator: Locator) -> bytes:
        """The item's bytes; a ProblemError when they cannot be read (the item fails alone)."""
        try:
            if locator.kind == "file":
                return Path(locator.path).read_bytes()
            if locator.kind == "tar":
                with open(locator.path, "rb") as archive:
                    archive.seek(locator.group)
                    return archive.read(locator.row)
            if locator.kind == "parquet":
                return self._value(self._parquet_value(locator), locator)
            with open(locator.path, "rb") as lines:
                lines.seek(locator.group)
                record = json.loads(lines.readline())
            return self._value(record.get(locator.column), locator)
        except OSError as exc:
            raise BadRequest(f"{locator.path}: cannot be read ({exc.strerror or exc}).") from None

    def _parquet_value(self, locator: Locator) -> Any:
        import pyarrow.parquet as pq

        wanted = (locator.group, locator.column)
        with self._lock:
            held = self._groups.get(locator.path)
            if held is None or held[0] != wanted:
                group = pq.ParquetFile(locator.path).read_row_group(
                    locator.group, columns=[locator.column]
                )
                held = (wanted, group.column(0).to_pylist())
                self._groups[locator.path] = held
            return held[1][locator.row]

    @staticmethod
    def _value(value: Any, locator: Locator) -> bytes:
        """A column's value as bytes: binary as is, a string as a path (relative to the table's
        folder), a {bytes, path} struct (Hugging Face's Image and Audio) by whichever is set;
        in JSONL, bytes are base64 in a {"bytes": ...} object."""
        if isinstance(value, dict):
            data = value.get("bytes")
            if data:
                return data if isinstance(data, bytes) else base64.b64decode(data)
            value = value.get("path")
        if isinstance(value, bytes):
            return value
        if isinstance(value, str) and value:
            return (Path(locator.path).parent / value).read_bytes()
        where = f"{locator.path} row {locator.row}, column {locator.column!r}"
        raise BadRequest(
            f"{where} holds {type(value).__name__}; expected the file's bytes, a path, or a "
            "{bytes, path} struct."
        )


def read_or_problem(reader: Reader, locator: Locator) -> bytes | ProblemError:
    """``reader.read``, with a failure returned as the item's problem rather than raised."""
    try:
        return reader.read(locator)
    except ProblemError as exc:
        return exc
