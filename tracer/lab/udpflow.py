"""A long-lived DNS client: one UDP socket, one source port, a query every INTERVAL.

What a resolver or an application with a kept socket does, and what keeps a UDP
conntrack entry alive across an endpoint change (the stale-conntrack fault). Run in
a pod's netns; stdlib only (the lab starts it with -I). Each line of its log is
"sent N answered M" after every query, so the lab can tell when the flow works.

usage: python3 -I udpflow.py --server IP [--port 53] --sport PORT [--interval S]
       --name NAME --log FILE
"""

from __future__ import annotations

import argparse
import socket
import struct
import time


def query(name: str, qid: int) -> bytes:
    """A DNS query for NAME's A record (RFC 1035 4.1), recursion desired."""
    head = struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split("."))
    return head + labels + b"\0" + struct.pack("!HH", 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--sport", type=int, required=True)
    ap.add_argument("--interval", type=float, default=0.3)
    ap.add_argument("--name", default="export.prod.svc.cluster.local")
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.sport))
    sock.connect((args.server, args.port))
    sock.settimeout(args.interval)
    sent = answered = 0
    with open(args.log, "a", buffering=1) as log:
        while True:
            sock.send(query(args.name, sent))
            sent += 1
            deadline = time.monotonic() + args.interval
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    sock.recv(4096)
                    answered += 1
                except TimeoutError:
                    break
                except OSError:  # ICMP errors on a connected socket (refused, unreachable)
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    break
            log.write(f"sent {sent} answered {answered}\n")


if __name__ == "__main__":
    main()
