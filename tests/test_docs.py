"""The documentation's links work: every code link in docs/gradients.md lands on its definition,
every backward in npgpt is derived there, and every file or picture the docs point to exists. The
exercises the README and the notebook name exist, and the README's example session is the real one."""
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


@pytest.mark.parametrize("doc", ["docs/gradients.md", "README.md", "notebooks/build_gpt.ipynb"])
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
    headings |= set(re.findall(r'<a id="([\w-]+)"></a>', GRADIENTS))  # the known mistakes' paragraphs
    used = set(re.findall(r"gradients\.md#([\w-]+)", GRADIENTS + "".join(
        (ROOT / f).read_text() for f in ("npgpt/layers.py", "npgpt/model.py", "npgpt/optim.py",
                                         "README.md", "notebooks/build_gpt.ipynb"))))
    used |= set(re.findall(r"\]\(#([\w-]+)\)", GRADIENTS))
    assert used, "no anchors found"
    assert not used - headings, f"anchors without a heading: {sorted(used - headings)}"


def _code_lines(text: str) -> list[str]:
    """Lines without their trailing comment or indentation, blank ones dropped."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_as_coded_snippets_are_the_code_itself():
    """Every line of every python snippet in docs/gradients.md (but `...`) is a line of the
    reference (npgpt/layers.py, model.py, optim.py, muon.py): when the code changes, the docs must too."""
    source = set()
    for name in ("layers.py", "model.py", "optim.py", "muon.py"):
        source.update(_code_lines((ROOT / "npgpt" / name).read_text()))
    snippets = re.findall(r"```python\n(.*?)```", GRADIENTS, flags=re.S)
    assert len(snippets) >= 12
    missing = [line for snippet in snippets for line in _code_lines(snippet)
               if line != "..." and line not in source]
    assert not missing, f"docs/gradients.md shows lines the code no longer has: {missing}"


def _github_anchors(headings: list[str]) -> list[str]:
    """GitHub's anchors: lowercase, punctuation dropped, spaces -> '-', a repeat gets -1, -2, ..."""
    seen: dict[str, int] = {}
    anchors = []
    for heading in headings:
        base = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(base, 0)
        seen[base] = n + 1
        anchors.append(base if n == 0 else f"{base}-{n}")
    return anchors


def test_contents_lists_every_section_in_order():
    """The Contents of docs/gradients.md is one entry per "## " and "### " heading after it, in the
    headings' order, a "### " nested under its "## ", each linking to its heading's anchor: a section
    added without its entry (or an entry whose section moved or was renamed) fails here."""
    lines, in_code = [], False
    for line in GRADIENTS.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    found = [(len(m[1]), m[2].strip()) for line in lines if (m := re.match(r"^(#{2,6}) (.+)$", line))]
    anchors = _github_anchors([title for _, title in found])
    first = [title for _, title in found].index("Contents")
    want = [(level, title, anchor) for (level, title), anchor in zip(found, anchors)][first + 1:]
    assert want and all(level <= 3 for level, _, _ in want), \
        f"headings deeper than ### would need their own Contents rule: {want}"

    block = GRADIENTS.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    entries = [m for line in block.splitlines() if line.strip()
               for m in [re.fullmatch(r"( *)- \[(.+)\]\(#([\w-]+)\)", line)]]
    assert all(entries), f"Contents lines must be `- [Title](#anchor)`, two spaces per level: {block!r}"
    got = [(2 + len(m[1]) // 2, m[2], m[3]) for m in entries]
    assert got == want, ("docs/gradients.md's Contents differs from its headings:\n"
                         f"missing: {[w for w in want if w not in got]}\n"
                         f"extra or wrong: {[g for g in got if g not in want]}\n"
                         "(or the order differs); one `- [Title](#anchor)` per ## heading, "
                         "`  - [Title](#anchor)` per ### heading, in the headings' order")


# --------------------------------------------------------------------------------------------
# The exercises in the README and the notebook
# --------------------------------------------------------------------------------------------

def _notebook_text() -> str:
    import json
    cells = json.loads((ROOT / "notebooks" / "build_gpt.ipynb").read_text())["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells)


def _study_order() -> list[str]:
    """The exercise column of the README's suggested order, in order."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| # | exercise |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [name for line in table for name in re.findall(r"`(\w+)`", line.split("|")[2])]


def test_the_exercises_the_docs_name_exist():
    """Every `python -m exercises start/check NAME` of the README and the notebook names an exercise
    of the CLI's registry; the README's suggested order holds each exercise once; the notebook
    links each exercise it names to that exercise's own section."""
    from exercises import registry

    names = [ex.name for ex in registry.EXERCISES]
    readme, notebook = (ROOT / "README.md").read_text(), _notebook_text()
    for doc, text in (("README.md", readme), ("notebooks/build_gpt.ipynb", notebook)):
        named = re.findall(r"python -m exercises (?:start|check) ([a-z]\w*)", text)
        assert named or doc == "README.md" and "python -m exercises start NAME" in text, doc
        unknown = sorted(set(named) - set(names))
        assert not unknown, f"{doc} names exercises that do not exist: {unknown}"
    order = _study_order()
    assert sorted(order) == sorted(names), f"the README's order lacks {set(names) - set(order)} or has extra {set(order) - set(names)}"
    linked = re.findall(r"python -m exercises start (\w+)`, derived in \[[^]]+\]\(\.\./docs/gradients\.md#([\w-]+)\)",
                        notebook)
    assert len(linked) >= 10
    wrong = [(name, anchor) for name, anchor in linked if registry.get(name).anchor != anchor]
    assert not wrong, f"the notebook links these exercises to another section: {wrong}"


def _masked(text: str) -> list[str]:
    """Lines with the numbers of the table (3 significant digits, which rounding may move) masked."""
    return [re.sub(r"\d\.\d\de[+-]\d\d", "#.##e+##", line) for line in text.splitlines()]


def test_the_readme_session_is_real(tmp_path, monkeypatch, capsys):
    """The README's example session, rerun: `start` prints what it shows, the backward it shows is
    written into the file start wrote, and `check` prints what it shows (numbers aside) and exits 1."""
    from exercises import cli

    readme = (ROOT / "README.md").read_text()
    block = readme.split("A session, as it runs", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    commands = re.split(r"^\$ (.*)$", block, flags=re.M)[1:]  # [command, its output, command, ...]
    shown = dict(zip(commands[0::2], commands[1::2]))
    start, show, check, status = list(shown)
    assert (start, check, status) == ("python -m exercises start layernorm",
                                      "python -m exercises check layernorm my_backprop/layernorm.py", "echo $?")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["start", "layernorm"]) == 0
    assert capsys.readouterr().out == shown[start].lstrip("\n")
    path = tmp_path / "my_backprop" / "layernorm.py"
    written = path.read_text()
    backward = shown[show].lstrip("\n")
    head = "\n".join(backward.splitlines()[:2])  # the signature and the docstring are start's
    assert head in written
    path.write_text(written.split(head, 1)[0] + backward)
    code = cli.main(["check", "layernorm", "my_backprop/layernorm.py"])
    out = capsys.readouterr().out
    assert _masked(out) == _masked(shown[check].lstrip("\n")), out
    assert str(code) == shown[status].strip()
