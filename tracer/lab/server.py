"""A lab pod's HTTP server: answers every GET with the pod's name and address.

Standard library only, run by path inside a pod netns (``python3 -I server.py``),
so it needs no installed package. The body names the backend that served the
request, which lets a test check each traced connection's backend. The listen
backlog is large so that hundreds of concurrent connections are not dropped by
the accept queue (which would be a fault of the lab, not of the path).
"""

from __future__ import annotations

import argparse
import http.server


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 4096
    daemon_threads = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    body = f"{args.name} {args.bind}\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # /big: 256 KiB (full-sized segments: what an MTU black hole swallows)
            data = body * (262144 // len(body) + 1) if self.path == "/big" else body
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    _Server((args.bind, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
