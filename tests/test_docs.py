"""The documentation: examples everywhere, executed; the API reference is current; links resolve."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

import gpart

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))
import make_docs  # noqa: E402

PUBLIC = [n for n in gpart.__all__ if n != "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_documented_with_a_runnable_example(name):
    obj = getattr(gpart, name)
    doc = inspect.getdoc(obj) or ""
    assert len(doc) > 40, f"gpart.{name} needs a docstring"
    if not (inspect.isclass(obj) and issubclass(obj, Exception)):
        assert ">>>" in doc, f"gpart.{name}'s docstring needs an example (run by --doctest-modules)"
    # and the reference shows it
    assert f"### `gpart.{name}" in (DOCS / "api.md").read_text()


def test_api_reference_is_current():
    assert (DOCS / "api.md").read_text() == make_docs.api_markdown(), "run: python docs/make_docs.py"


def test_method_figure_builds(tmp_path):
    make_docs.method_figure(tmp_path / "method.png")
    assert (tmp_path / "method.png").stat().st_size > 10_000


def _python_blocks(path: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    return [b for b in blocks if not b.startswith("# not run")]


GUIDES = sorted(p for p in DOCS.glob("*.md") if _python_blocks(p))


def test_guides_with_code_exist():
    assert {p.name for p in GUIDES} >= {"guide.md", "integrations.md", "method.md", "faq.md"}


@pytest.mark.parametrize("path", GUIDES, ids=lambda p: p.name)
def test_python_blocks_in_the_docs_run(path, capsys):
    namespace: dict = {"__name__": f"docs.{path.stem}"}
    for block in _python_blocks(path):
        exec(compile(block, str(path), "exec"), namespace)


def test_readme_links_every_doc_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    for doc in DOCS.glob("*.md"):
        assert f"docs/{doc.name}" in readme, f"README does not link docs/{doc.name}"
    for source in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", source.read_text()):
            if not target.startswith("http"):
                assert (source.parent / target).exists(), f"{source.name}: broken link {target}"
