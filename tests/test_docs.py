"""Citations stay inside the repository and do not rot.

Code, docs and tests cite Adobe's public pages or a section of docs/aep-notes.md, written
``docs/aep-notes.md#<section>`` (``aep-notes.md#<section>`` from inside docs/), never a file
outside the repository. scripts/ is exempt: derive_aep_schemas.py takes Adobe's OpenAPI folder
next to the repository as its default ``--source``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTES = REPO / "docs" / "aep-notes.md"
EXEMPT = ("scripts/",)

# Spelled in pieces so that searching the repository for these strings finds offenders only.
OUTSIDE = re.compile(
    "|".join(
        (
            r"aep-" + r"api\.md",  # the facts file the notes replaced
            r"\.\./sha" + r"red\b",  # the folder next to the repository
            r"/wo" + r"rk/",  # absolute paths on the machine the project was written on
            r"/ho" + r"me/",
            r"/tm" + r"p/\S*shared",
        )
    )
)
CITATION = re.compile(r"aep-notes\.md#([A-Za-z0-9_-]+)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def tracked_texts() -> dict[str, str]:
    """Every tracked text file, by its path relative to the repository."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"],  # noqa: S607 - git from PATH, as a developer runs it
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    texts: dict[str, str] = {}
    for name in filter(None, listed.split("\0")):
        path = REPO / name
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images
            continue
    return texts


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to -."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return kept.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {slug(h) for h in HEADING.findall(markdown)}


def outside_citations(texts: dict[str, str]) -> list[str]:
    """`path:line: text` for each line outside scripts/ that points outside the repository."""
    found = []
    for name, text in texts.items():
        if name.startswith(EXEMPT):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    return found


def dangling_citations(texts: dict[str, str], sections: set[str]) -> list[str]:
    """`path:line: #section` for each aep-notes citation whose section does not exist."""
    found = []
    for name, text in texts.items():
        for number, line in enumerate(text.splitlines(), 1):
            found += [f"{name}:{number}: #{m}" for m in CITATION.findall(line) if m not in sections]
    return found


def test_slug_follows_githubs_anchor_rules() -> None:
    assert slug("The engine's readings (export lanes)") == "the-engines-readings-export-lanes"
    assert slug("Errors that echo values, and what we scrub") == (
        "errors-that-echo-values-and-what-we-scrub"
    )
    assert anchors("# Top\n\ntext\n\n### Ad hoc dataset exports\n") == {
        "top",
        "ad-hoc-dataset-exports",
    }


def test_the_checks_catch_what_they_are_for() -> None:
    facts, notes = "aep-" + "api.md", "aep-notes.md"
    texts = {
        "aep_emulator/x.py": f"# (see {facts} §7.1)\n",
        "tests/test_x.py": '"""Read /' + 'work/shared/spec.yaml first."""\n',
        # Through a variable, so that this file cites no section itself.
        "docs/x.md": f"[notes]({notes}#no-such-section) and [ok]({notes}#real)\n",
        "scripts/derive.py": "DEFAULT = '../" + "shared/aep-openapi'\n",
    }
    assert outside_citations(texts) == [
        f"aep_emulator/x.py:1: # (see {facts} §7.1)",
        "tests/test_x.py:1: " + '"""Read /' + 'work/shared/spec.yaml first."""',
    ]
    assert dangling_citations(texts, {"real"}) == ["docs/x.md:1: #no-such-section"]


def test_no_tracked_file_cites_a_file_outside_the_repository() -> None:
    texts = tracked_texts()
    assert "docs/aep-notes.md" in texts, "git ls-files lists the repository's files"
    offenders = outside_citations(texts)
    assert not offenders, (
        "cite Adobe's public pages or a docs/aep-notes.md section instead:\n" + "\n".join(offenders)
    )


def test_every_cited_aep_notes_section_exists() -> None:
    texts = tracked_texts()
    sections = anchors(NOTES.read_text(encoding="utf-8"))
    cited = {m for text in texts.values() for m in CITATION.findall(text)}
    assert cited, "the code cites docs/aep-notes.md sections; none were found"
    dangling = dangling_citations(texts, sections)
    assert not dangling, (
        "these docs/aep-notes.md sections do not exist (add them or fix the citation):\n"
        + "\n".join(dangling)
    )
