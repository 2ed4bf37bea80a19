"""What every hairtrace command prints on failure, and how it writes JSON files."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO, Any, NoReturn

import click

from tracer.errors import HairtraceError
from tracer.present.jsontext import dumps_indented


def fail(exc: HairtraceError) -> NoReturn:
    """One line on stderr and the error's exit status."""
    click.echo(f"hairtrace: error: {exc}", err=True)
    sys.exit(exc.exit_code)


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


def write_json_with(write: Callable[[IO[bytes]], None], dest: str) -> None:
    """What write(stream) writes (a report streamed piece by piece, UTF-8) to a file, or
    to stdout for '-'."""
    if dest == "-":
        sys.stdout.flush()
        write(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    try:
        with open(dest, "wb") as fh:
            write(fh)
    except OSError as exc:
        raise HairtraceError(f"cannot write {dest}: {exc.strerror}") from exc
