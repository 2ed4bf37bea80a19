"""Many concurrent HTTP requests from one lab pod: the load half of the lab.

Standard library only, run by path inside the client pod's netns. Opens every
connection first, then sends the requests, so they are all open at once. Prints
one JSON object: per connection the local port, the HTTP status and the
backend named in the body (see server.py), or the error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket


class _Gate:
    """Opens once every connection attempt has finished (connected or failed)."""

    def __init__(self, n: int) -> None:
        self.left, self.open = n, asyncio.Event()

    def arrived(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.open.set()


def _why(exc: BaseException, timeout: float) -> str:
    """An error in words: str() of a TimeoutError is empty."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    return str(exc) or type(exc).__name__


async def _one(host: str, port: int, timeout: float, gate: _Gate) -> dict[str, object]:
    out: dict[str, object] = {"sport": None, "status": None, "backend": None, "error": None}
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
    except (TimeoutError, OSError) as exc:
        # A connect still pending (timed out) holds its local port; a refused one has
        # already given it back (0): then the port is not known.
        out["sport"] = sock.getsockname()[1] or None
        out["error"] = f"connect: {_why(exc, timeout)}"
        sock.close()
        gate.arrived()
        return out
    out["sport"] = sock.getsockname()[1]
    reader, writer = await asyncio.open_connection(sock=sock)
    gate.arrived()
    try:
        await gate.open.wait()
        writer.write(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
        head, _, body = data.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        out["status"] = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        words = body.decode(errors="replace").split()
        out["backend"] = words[1] if len(words) > 1 else None
        if out["status"] is None:
            out["error"] = "request: no HTTP status in the answer"
    except (TimeoutError, OSError) as exc:
        out["error"] = f"request: {_why(exc, timeout)}"
    finally:
        writer.close()
    return out


async def _run(host: str, port: int, n: int, timeout: float) -> list[dict[str, object]]:
    gate = _Gate(n)
    return list(await asyncio.gather(*(_one(host, port, timeout, gate) for _ in range(n))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    results = asyncio.run(_run(args.host, args.port, args.n, args.timeout))
    print(json.dumps({"connections": results}))


if __name__ == "__main__":
    main()
