"""The README's Python examples run and print what their comments say."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def expected_prints(block: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^[ \t]*print\(.*\)[ \t]*#[ \t]*(.+)$", block, flags=re.M)]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    expected = expected_prints(block)
    if expected:
        assert out.getvalue().splitlines()[-len(expected):] == expected


# --- the README's shape: a front door, then the manual ------------------------------------------

TEXT = README.read_text()
PROSE = re.sub(r"^```.*?^```[ \t]*$", "", TEXT, flags=re.S | re.M)  # without fenced blocks (# comments)
HEADINGS = re.findall(r"^(#{1,6}) (.+)$", PROSE, flags=re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_to_a_section_names_a_heading():
    anchors = {slug(title) for _, title in HEADINGS}
    links = re.findall(r"\]\(#([^)]+)\)", PROSE)
    assert links, "the feature list and the contents link to the sections"
    assert sorted(set(links) - anchors) == []


def test_the_front_door_comes_first_and_is_short():
    lines = TEXT.splitlines()
    assert max(lines.index("<!-- command: demo -->"), lines.index("<!-- command: tests -->")) < 30
    assert lines.index("## Contents") < 120


def test_every_section_of_the_manual_ends_with_what_is_guaranteed():
    contents = TEXT.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    sections = re.findall(r"^\d+\. \[([^\]]+)\]\(#", contents, flags=re.M)
    assert len(sections) >= 10
    for title in sections[:-1]:  # the last one, "Design and contributing", is for contributors
        body = PROSE.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        *_, last = body.split("\n\n**Guaranteed")
        assert last != body and "\n#" not in last, f"section {title!r} must end with a '**Guaranteed' paragraph"
