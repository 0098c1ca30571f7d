"""The documentation's links work: every code link in docs/gradients.md lands on its definition,
every backward in npgpt is derived there, and every file or picture the docs point to exists."""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

import npgpt.layers as layers
from npgpt.model import GPT, BigramLanguageModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import relink  # noqa: E402

GRADIENTS = (ROOT / "docs" / "gradients.md").read_text()


def test_code_links_land_on_their_definitions():
    links = relink.LINK.findall(GRADIENTS)
    assert len(links) >= 20
    stale = [f"{name} -> {file}#L{line}" for name, file, line in links
             if relink.definition_lines(ROOT / file).get(name) != int(line)]
    assert not stale, f"stale links (run `python docs/relink.py`): {stale}"


def test_every_backward_is_derived_and_linked():
    backwards = [name for name, _ in inspect.getmembers(layers, inspect.isfunction)
                 if name.endswith("_backward") and not name.startswith("_")]
    backwards += ["GPT.backward", "BigramLanguageModel.backward"]
    missing = [name for name in backwards if f"[`{name}`](../npgpt/" not in GRADIENTS]
    assert not missing, f"docs/gradients.md has no linked section for {missing}"
    assert GPT.backward.__doc__ and BigramLanguageModel.backward.__doc__


@pytest.mark.parametrize("doc", ["docs/gradients.md", "README.md"])
def test_relative_links_exist(doc):
    text = (ROOT / doc).read_text()
    base = (ROOT / doc).parent
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", text)
    assert targets, f"{doc} links to nothing"
    missing = [t for t in targets if not (base / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"


def test_anchor_links_name_existing_headings():
    def anchor(heading: str) -> str:  # GitHub's rule: lowercase, drop punctuation, spaces -> '-'
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", GRADIENTS, flags=re.M)}
    used = set(re.findall(r"gradients\.md#([\w-]+)", GRADIENTS + "".join(
        (ROOT / "npgpt" / f).read_text() for f in ("layers.py", "model.py", "optim.py"))))
    used |= set(re.findall(r"\]\(#([\w-]+)\)", GRADIENTS))
    assert used, "no anchors found"
    assert not used - headings, f"anchors without a heading: {sorted(used - headings)}"


def _code_lines(text: str) -> list[str]:
    """Lines without their trailing comment or indentation, blank ones dropped."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_as_coded_snippets_are_the_code_itself():
    """Every line of every python snippet in docs/gradients.md (but `...`) is a line of the
    reference (npgpt/layers.py, model.py, optim.py): when the code changes, the docs must too."""
    source = set()
    for name in ("layers.py", "model.py", "optim.py"):
        source.update(_code_lines((ROOT / "npgpt" / name).read_text()))
    snippets = re.findall(r"```python\n(.*?)```", GRADIENTS, flags=re.S)
    assert len(snippets) >= 12
    missing = [line for snippet in snippets for line in _code_lines(snippet)
               if line != "..." and line not in source]
    assert not missing, f"docs/gradients.md shows lines the code no longer has: {missing}"
