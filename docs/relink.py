"""Refresh the line anchors of docs/gradients.md after npgpt's code moved.

    python docs/relink.py          # rewrites [`name`](../npgpt/file.py#LNN) links in place

Each link names a function or method (`layernorm_backward`, `GPT.backward`); its line number is
looked up in the source with the ast module. tests/test_docs.py fails when a link is stale.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "gradients.md"
LINK = re.compile(r"\[`([\w.]+)`\]\(\.\./(npgpt/\w+\.py)#L(\d+)\)")


def definition_lines(path: Path) -> dict[str, int]:
    """{'name': line, 'Class.method': line} for the module's top-level functions and classes."""
    lines = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            lines[node.name] = node.lineno
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef):
                    lines[f"{node.name}.{sub.name}"] = sub.lineno
    return lines


def relink(text: str) -> str:
    cache: dict[str, dict[str, int]] = {}

    def fix(m: re.Match) -> str:
        name, file = m[1], m[2]
        lines = cache.setdefault(file, definition_lines(ROOT / file))
        if name not in lines:
            raise SystemExit(f"error: docs/gradients.md links `{name}` in {file}, which defines no such name")
        return f"[`{name}`](../{file}#L{lines[name]})"

    return LINK.sub(fix, text)


def main() -> int:
    text = DOC.read_text()
    new = relink(text)
    if new != text:
        DOC.write_text(new)
        print("docs/gradients.md: line anchors updated")
    else:
        print("docs/gradients.md: line anchors already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
