"""What every hairtrace command prints on failure, and how it writes JSON files."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from tracer.errors import HairtraceError


def fail(exc: HairtraceError) -> NoReturn:
    """One line on stderr and the error's exit status."""
    click.echo(f"hairtrace: error: {exc}", err=True)
    sys.exit(exc.exit_code)


def write_json(data: dict[str, Any], dest: str) -> None:
    """Indented JSON to a file, or to stdout for '-'."""
    text = json.dumps(data, indent=2) + "\n"
    if dest == "-":
        click.echo(text, nl=False)
        return
    try:
        with open(dest, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise HairtraceError(f"cannot write {dest}: {exc.strerror}") from exc
