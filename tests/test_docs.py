"""The documentation holds to what it documents: the README stays a front page whose figures are the measured
ones, the configuration table is what server/options.py generates, and every link, test file and Python version
named in the text exists.

    python -m pytest tests/test_docs.py -q
"""

from __future__ import annotations

import re

import pytest
from conftest import ROOT
from loopgpt.server.options import BEGIN, END, options_markdown

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MEASURED = [ROOT / "docs" / "performance.md", ROOT / "docs" / "results.md"]


def test_readme_is_a_front_page():
    assert len(README.read_text(encoding="utf-8").splitlines()) < 200


def test_every_figure_in_the_readme_is_a_measured_one():
    """Each ratio (`0.12×`) and percentage the README states appears, with the same value, where it was measured."""
    readme = README.read_text(encoding="utf-8")
    measured = "\n".join(p.read_text(encoding="utf-8") for p in MEASURED)
    figures = re.findall(r"\d+(?:\.\d+)?\s?[×%]", readme)
    assert figures, "the README quotes no measured figure (this check would pass vacuously)"
    for figure in figures:
        assert figure in measured, f"README states {figure!r}, which docs/performance.md and docs/results.md do not"


def test_the_readme_names_the_python_that_pyproject_requires():
    # tomllib is 3.11's: a regex reads the one line on 3.10 too
    minimum = re.search(r'^requires-python = ">=(\d+\.\d+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert f"Python {minimum} or newer" in README.read_text(encoding="utf-8")


def test_the_configuration_table_is_generated_from_the_options():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = text.partition(BEGIN)[2].partition(END)[0]
    assert table.strip() == options_markdown().strip(), (
        "docs/configuration.md is stale: python -m loopgpt.server.options --write docs/configuration.md")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # a `# comment` is no heading
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page.name} links to {target}: no such heading in {path.name}"


def test_every_test_file_named_in_the_tree_exists():
    """Comments and docs that point at a test file point at one that exists (two once named files never written)."""
    named = set()
    tops = [p for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"]  # not .venv, .git
    for path in [p for top in tops for p in ([top] if top.is_file() else top.rglob("*"))]:
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ""} and path.is_file():
            named |= set(re.findall(r"tests/test_\w+\.py", path.read_text(encoding="utf-8", errors="replace")))
    assert named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing
