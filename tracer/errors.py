"""The one error type the library raises; the CLI turns it into a message and an exit status."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BROKEN = 3


class HairtraceError(Exception):
    """A failure the user can act on: the message is one specific line."""

    exit_code = EXIT_FAILURE


class UsageError(HairtraceError):
    """Bad input from the user (address, port, netns name, command)."""

    exit_code = EXIT_USAGE
