"""The command line of the exercises: list, start, check, status (exercises/__init__.py documents
them and their exit codes). main(argv) returns the exit code; tests call it in-process."""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from . import check as checker
from . import registry, template

DEFAULT_DIR = "my_backprop"
PASS, WRONG, BAD_INPUT = checker.PASS, checker.WRONG, checker.BAD_INPUT


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line and exit code 2 (argparse's own)."""

    def error(self, message):
        self.exit(BAD_INPUT, f"error: {message} (python -m exercises --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m exercises", description="Backprop exercises: write a backward, have it checked.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="every exercise, with the section of docs/gradients.md that derives it")
    s = sub.add_parser("start", help="write DIR/NAME.py: the question to answer")
    s.add_argument("name")
    s.add_argument("--dir", default=DEFAULT_DIR, help=f"where to write NAME.py (default {DEFAULT_DIR})")
    s.add_argument("--force", action="store_true", help="overwrite an existing DIR/NAME.py")
    c = sub.add_parser("check", help="check FILE's NAME_backward against the reference and finite differences")
    c.add_argument("name")
    c.add_argument("file")
    c.add_argument("--timeout", type=float, default=checker.DEFAULT_TIMEOUT,
                   help=f"seconds your code may run, all cases together (default {checker.DEFAULT_TIMEOUT:g})")
    st = sub.add_parser("status", help="which exercises in DIR pass")
    st.add_argument("dir", nargs="?", default=DEFAULT_DIR)
    st.add_argument("--timeout", type=float, default=checker.DEFAULT_TIMEOUT, help="per exercise, as for check")
    return p


def _unknown(name: str) -> int:
    print(f"error: unknown exercise '{name}': `python -m exercises list` shows them", file=sys.stderr)
    return BAD_INPUT


def cmd_list(args) -> int:
    width = max(len(ex.name) for ex in registry.EXERCISES)
    for ex in registry.EXERCISES:
        print(f"{ex.name:<{width}}  {ex.title}  ({ex.doc})")
    return PASS


def cmd_start(args) -> int:
    if registry.get(args.name) is None:
        return _unknown(args.name)
    directory = Path(args.dir)
    path = directory / f"{args.name}.py"
    if path.exists() and not args.force:
        print(f"error: {path} exists; pass --force to overwrite it (your work in it would be lost)",
              file=sys.stderr)
        return BAD_INPUT
    if directory.exists() and not directory.is_dir():
        print(f"error: {directory} is a file, not a directory: pass --dir to write elsewhere", file=sys.stderr)
        return BAD_INPUT
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(template.text(args.name, str(path)))
    print(f"wrote {path}: write {args.name}_backward in it, then: python -m exercises check {args.name} {path}")
    return PASS


def cmd_check(args) -> int:
    return checker.check(args.name, args.file, args.timeout).code


def cmd_status(args) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"error: {directory}: no such directory (`python -m exercises start NAME --dir {directory}` "
              f"makes it)", file=sys.stderr)
        return BAD_INPUT
    if not args.timeout > 0:
        print(f"error: --timeout must be a positive number of seconds, got {args.timeout}", file=sys.stderr)
        return BAD_INPUT
    rows = []
    for ex in registry.EXERCISES:
        path = directory / f"{ex.name}.py"
        if not path.exists():
            rows.append((ex.name, "-", "not started"))
            continue
        result = checker.check(ex.name, str(path), args.timeout, out=io.StringIO(), err=io.StringIO())
        word = {PASS: "pass", WRONG: "FAIL", BAD_INPUT: "cannot check"}[result.code]
        detail = "" if result.code == PASS else f": {result.summary.removeprefix('wrong: ')}"
        if "raises NotImplementedError: it is not written yet" in result.summary:
            word, detail = "not written yet", " (raises NotImplementedError)"
        rows.append((ex.name, str(path), word + detail))
    width = max(len("exercise"), *(len(r[0]) for r in rows))
    fwidth = max(len("file"), *(len(r[1]) for r in rows))
    print(f"{'exercise':<{width}}  {'file':<{fwidth}}  result")
    for name, file, result in rows:
        print(f"{name:<{width}}  {file:<{fwidth}}  {result}")
    passed = sum(r[2] == "pass" for r in rows)
    started = sum(r[2] != "not started" for r in rows)
    print(f"{passed} of {len(rows)} pass ({started} started); `python -m exercises check NAME FILE` says more")
    return PASS


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return {"list": cmd_list, "start": cmd_start, "check": cmd_check, "status": cmd_status}[args.command](args)
