"""A minimal client of the Kubernetes Container Runtime Interface (CRI v1), for the labs.

The lab asks a real runtime (containerd's CRI plugin) for pod sandboxes the way the kubelet
does: RunPodSandbox with the pod's metadata (name, namespace, uid), so the runtime creates
the pod's network namespace and runs the CNI plugins with `K8S_POD_NAMESPACE` /
`K8S_POD_NAME` in CNI_ARGS, and libcni caches the result in /var/lib/cni/results. hairtrace
reads what that leaves on the node; this module only plays the kubelet.

The few messages used are encoded by hand (protobuf wire format, field numbers from
cri-api's pkg/apis/runtime/v1/api.proto) and sent with grpcio's generic unary calls, so
no generated code is needed. grpcio is a lab/test dependency, never the tracer's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tracer.errors import HairtraceError

SERVICE = "/runtime.v1.RuntimeService/"
TIMEOUT_S = 60.0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _bytes(field: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings, messages, map entries."""
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode()) if text else b""


def _uint(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n) if n else b""


def _map(field: int, items: Mapping[str, str]) -> bytes:
    return b"".join(_bytes(field, _str(1, k) + _str(2, v)) for k, v in sorted(items.items()))


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of one message: ints for varints, bytes for
    length-delimited fields (fixed-size fields are skipped)."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            yield field, value
        elif wire == 2:
            n, i = _read_varint(data, i)
            yield field, data[i : i + n]
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise HairtraceError(f"CRI: unexpected protobuf wire type {wire}")


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def _first(data: bytes, field: int) -> bytes:
    for f, v in _fields(data):
        if f == field and isinstance(v, bytes):
            return v
    return b""


@dataclass(frozen=True)
class PodSpec:
    """The part of a Pod the runtime sees at sandbox creation."""

    namespace: str
    name: str
    uid: str
    hostname: str = ""
    labels: Mapping[str, str] | None = None

    def config(self, log_dir: str) -> bytes:
        """PodSandboxConfig: metadata {1 name, 2 uid, 3 namespace, 4 attempt}, 2 hostname,
        3 log_directory, 6 labels, 8 linux {} (defaults)."""
        metadata = _str(1, self.name) + _str(2, self.uid) + _str(3, self.namespace)
        return (_bytes(1, metadata) + _str(2, self.hostname or self.name) + _str(3, log_dir)
                + _map(6, self.labels or {}) + _bytes(8, b""))  # fmt: skip


@dataclass(frozen=True)
class Sandbox:
    id: str
    name: str
    namespace: str
    ip: str
    netns_path: str


class Runtime:
    """A CRI runtime at a unix socket (containerd's /run/containerd/containerd.sock)."""

    def __init__(self, socket_path: str) -> None:
        try:
            import grpc
        except ImportError:
            raise HairtraceError("the runtime lab needs grpcio: pip install grpcio") from None
        self._grpc = grpc
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.socket_path = socket_path

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: bytes) -> bytes:
        call = self._channel.unary_unary(SERVICE + method)
        try:
            reply: bytes = call(request, timeout=TIMEOUT_S)
        except self._grpc.RpcError as exc:
            raise HairtraceError(f"CRI {method} at {self.socket_path}: {exc.details()}") from None
        return reply

    def version(self) -> str:
        """runtime_name runtime_version (VersionResponse fields 2 and 3)."""
        reply = self._call("Version", _str(1, "v1"))
        got = {f: v for f, v in _fields(reply) if isinstance(v, bytes)}
        return f"{got.get(2, b'').decode()} {got.get(3, b'').decode()}"

    def run_pod_sandbox(self, pod: PodSpec, log_dir: str) -> str:
        """The new sandbox's id (RunPodSandboxRequest {1 config}; response {1 id})."""
        reply = self._call("RunPodSandbox", _bytes(1, pod.config(log_dir)))
        return _first(reply, 1).decode()

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._call("StopPodSandbox", _str(1, sandbox_id))

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._call("RemovePodSandbox", _str(1, sandbox_id))

    def status(self, sandbox_id: str) -> Sandbox:
        """PodSandboxStatus (verbose): id, metadata, the IP (status.network.ip) and the
        network namespace path (from the verbose info's runtime spec)."""
        reply = self._call("PodSandboxStatus", _str(1, sandbox_id) + _uint(2, 1))
        status = _first(reply, 1)
        meta = _first(status, 2)
        ip = _first(_first(status, 5), 1).decode()
        info: dict[str, str] = {}
        for f, v in _fields(reply):
            if f == 2 and isinstance(v, bytes):
                info[_first(v, 1).decode()] = _first(v, 2).decode()
        return Sandbox(
            id=_first(status, 1).decode(),
            name=_first(meta, 1).decode(),
            namespace=_first(meta, 3).decode(),
            ip=ip,
            netns_path=_netns_path(info.get("info", "")),
        )

    def list_pod_sandboxes(self) -> list[str]:
        """Ids of every sandbox (ListPodSandboxResponse {1 items: PodSandbox {1 id}})."""
        reply = self._call("ListPodSandbox", b"")
        return [_first(v, 1).decode() for f, v in _fields(reply) if f == 1 and isinstance(v, bytes)]


def _netns_path(info: str) -> str:
    """The network namespace path in containerd's verbose sandbox info (its runtimeSpec)."""
    try:
        spec: Any = json.loads(info).get("runtimeSpec", {})
    except (ValueError, AttributeError):
        return ""
    for ns in spec.get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network":
            return str(ns.get("path", ""))
    return ""
