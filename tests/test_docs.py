"""The docs a newcomer walks: README.md and docs/*.md.

Every relative link resolves to a file (no anchors: a renamed heading must not break a link silently), the README
stays short and keeps its two set-up commands, and docs/configuration.md documents every setting and no other.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.settings import Settings
from tests.deployment_files import settings_env_names

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
README_MAX_LINES = 260
SETUP_COMMANDS = ["make run", "make test"]

_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
_ENV_NAME = re.compile(r"ORCH_[A-Z0-9_]+…?|…__[A-Z0-9_]+")


def links(path: Path) -> list[str]:
    """The targets of the Markdown links in `path`, outside code."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", path.read_text(encoding="utf-8")))
    return _LINK.findall(text)


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)


def test_the_docs_exist() -> None:
    names = {path.name for path in DOCS}
    expected = {"api.md", "configuration.md", "operations.md", "deployment.md", "benchmarks.md", "architecture.md"}
    assert expected <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_relative_links_point_at_files_without_anchors(path: Path) -> None:
    targets = [target for target in links(path) if relative(target)]
    assert targets, f"{path.name} links to no other doc"
    for target in targets:
        assert "#" not in target, f"{path.name}: {target!r} has an anchor; name the section in words instead"
        assert (path.parent / target).is_file(), f"{path.name}: {target!r} is not a file"


def test_readme_links_every_doc() -> None:
    linked = {(ROOT / target).resolve() for target in links(ROOT / "README.md") if relative(target)}
    assert set(DOCS[1:]) <= linked


def test_readme_stays_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_readme_set_up_commands_are_the_two_makefile_targets() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up and run", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", setup, re.M | re.S)
    assert block is not None, "the set-up section shows its commands in a sh block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == SETUP_COMMANDS
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for command in commands:
        target = command.removeprefix("make ")
        assert re.search(rf"^{target}:", makefile, re.M), f"the Makefile has no {target!r} target"


def documented_settings() -> tuple[set[str], set[str]]:
    """The names in the first column of docs/configuration.md's table, with `…__NAME` read as a sibling of the name
    before it; and the prefixes a name ending in `…` stands for (every setting under it)."""
    names: set[str] = set()
    prefixes: set[str] = set()
    for row in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8").splitlines():
        if not row.startswith("| `"):
            continue
        parent = ""
        for name in _ENV_NAME.findall(row.split(" | ", 1)[0]):
            if name.endswith("…"):
                prefixes.add(name.removesuffix("…"))
            elif name.startswith("…__"):
                names.add(parent + name.removeprefix("…__"))
            else:
                names.add(name)
                parent = name.rsplit("__", 1)[0] + "__"
    return names, prefixes


def test_configuration_documents_every_setting_and_no_other() -> None:
    settings = settings_env_names(Settings)
    names, prefixes = documented_settings()
    undocumented = {name for name in settings - names if not name.startswith(tuple(prefixes))}
    assert not undocumented, f"settings missing from docs/configuration.md: {sorted(undocumented)}"
    assert not names - settings, f"docs/configuration.md names no such settings: {sorted(names - settings)}"
    assert all(any(name.startswith(prefix) for name in settings) for prefix in prefixes)
