"""The documents in docs/ cite code that exists (the server's and the client's), and they and the
READMEs link only inside the repository: someone who clones it alone can follow every link."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
LINKED = [*DOCS, REPO_ROOT / "README.md", REPO_ROOT / "client" / "README.md"]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
# app/... as a path: not part of a longer word, path or name (``tokserve-app/`` is not one)
APP_PATH = re.compile(r"(?<![\w./-])app/[\w./-]*")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# the server's names (app.x.y) and the client package's (tokserve_client.x)
DOTTED_NAME = re.compile(r"(?:app|tokserve_client)(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(
    r"^\s*from ((?:app|tokserve_client)(?:\.\w+)*) import \(?([\w, ]+)", re.MULTILINE
)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(REPO_ROOT)) for path in paths]


def app_paths(text: str) -> set[str]:
    """Every app/... path the text cites, in prose and in code blocks alike."""
    return {match.rstrip(".,:;") for match in APP_PATH.findall(text)}


def dotted_names(text: str) -> set[str]:
    """Every ``app.x.y`` or ``tokserve_client.x`` name in an inline code span, and every name a
    code block imports from either."""
    names = set()
    for match in FROM_IMPORT.finditer(text):
        names |= {f"{match[1]}.{name.strip()}" for name in match[2].split(",") if name.strip()}
    prose = FENCE.sub("", text)
    for span in CODE_SPAN.findall(prose):
        name = DOTTED_NAME.match(span.strip())
        if name:
            names.add(name.group(0))
    return names


def resolves(name: str) -> bool:
    """Whether ``name`` is a module, or an attribute (at any depth) of the longest module that
    prefixes it."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def link_targets(text: str) -> list[str]:
    """The targets of the text's inline and reference-style links, outside code blocks."""
    prose = FENCE.sub("", text)
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def test_docs_exist() -> None:
    names = {path.name for path in DOCS}
    assert {"api.md", "architecture.md", "training.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_every_app_path_a_document_cites_exists(doc: Path) -> None:
    missing = sorted(p for p in app_paths(doc.read_text()) if not (REPO_ROOT / p).exists())
    assert not missing, f"{doc.name} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_every_python_name_a_document_cites_exists(doc: Path) -> None:
    missing = sorted(name for name in dotted_names(doc.read_text()) if not resolves(name))
    assert not missing, f"{doc.name} cites Python names that do not exist: {missing}"


@pytest.mark.parametrize("doc", LINKED, ids=_ids(LINKED))
def test_links_stay_inside_the_repository_and_resolve(doc: Path) -> None:
    problems = []
    for target in link_targets(doc.read_text()):
        if EXTERNAL.match(target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(REPO_ROOT):
            problems.append(f"{target} leaves the repository")
        elif not path.exists():
            problems.append(f"{target} does not exist")
    assert not problems, f"{doc.name}: {problems}"


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The patterns find paths, names and links where documents put them."""
    text = (
        "See `app/engine.py`, app/cache/. and `app.engine.Engine.start()`.\n"
        "`tokserve_client.unpack_streams(tokens, per_frame)`\n"
        "[out](../shared/DESIGN.md) [site](https://example.org) [here](#parts)\n"
        "```python\nfrom tokserve_client import Client, ItemsFailed\n"
        "[not a link](../x.md) `app.not_checked_in_code`\n```\n"
    )
    assert app_paths(text) == {"app/engine.py", "app/cache/"}
    assert dotted_names(text) == {
        "app.engine.Engine.start",
        "tokserve_client.unpack_streams",
        "tokserve_client.Client",
        "tokserve_client.ItemsFailed",
    }
    assert link_targets(text) == ["../shared/DESIGN.md", "https://example.org", "#parts"]
    assert resolves("app.config.Settings") and not resolves("app.config.NoSuchSetting")
    assert resolves("tokserve_client.Encoded") and not resolves("tokserve_client.pack_layout")
