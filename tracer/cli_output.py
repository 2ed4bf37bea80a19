"""What every hairtrace command prints on failure, and how it writes JSON files."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from tracer.errors import HairtraceError, UsageError
from tracer.present.jsontext import dumps_indented


def fail(exc: HairtraceError) -> NoReturn:
    """One line on stderr and the error's exit status."""
    click.echo(f"hairtrace: error: {exc}", err=True)
    sys.exit(exc.exit_code)


def check_writable(dest: str, option: str) -> None:
    """Raise UsageError when the file dest ('-' = stdout) cannot be written.

    Called before the work starts (a trace, a replay, an export): a typo in an output
    path found only at the end would lose the result and replace its exit status.
    """
    if dest == "-":
        return
    path = Path(dest)
    if dest.endswith("/") or path.is_dir():
        raise UsageError(f"{option} {dest}: is a directory, not a file")
    parent = path.parent
    if not parent.exists():
        raise UsageError(f"{option} {dest}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{option} {dest}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {dest}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {dest}: file is not writable")


def write_json(data: dict[str, Any], dest: str) -> None:
    """Indented JSON to a file, or to stdout for '-'."""
    text = dumps_indented(data) + "\n"  # json.dumps(data, indent=2), faster
    if dest == "-":
        click.echo(text, nl=False)
        return
    try:
        with open(dest, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise HairtraceError(f"cannot write {dest}: {exc.strerror}") from exc
