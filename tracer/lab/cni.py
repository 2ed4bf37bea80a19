"""Invoke a CNI plugin (the reference ``bridge`` plugin, in the lab) the way a runtime does.

A container runtime (containerd, via flannel's delegate config) runs the plugin
binary with ``CNI_*`` environment variables and the network config on stdin; the
plugin prints a JSON result or a JSON error ``{"code": N, "msg": ..., "details": ...}``.
The lab runs the plugin inside the node netns (``ip netns exec NODE ...``) so the
bridge and the host ends of the veths are created there, never in the caller's netns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracer.errors import HairtraceError
from tracer.lab import netns

DEFAULT_CNI_PATH = "/usr/lib/cni"


@dataclass(frozen=True)
class Attachment:
    """One pod's attachment to a CNI network: what ADD and DEL are keyed on."""

    container_id: str
    netns_path: str
    ifname: str = "eth0"
    # CNI_ARGS key/values, e.g. {"IP": "100.96.54.240"} to ask host-local for that address.
    args: Mapping[str, str] = field(default_factory=dict)


def cni_args(args: Mapping[str, str]) -> str:
    """The CNI_ARGS string for ``args``.

    ``IgnoreUnknown=1`` is always added: the bridge plugin parses CNI_ARGS itself
    and rejects keys it does not know (``IP`` belongs to host-local IPAM), so
    without it ``IP=...`` fails with "ARGS: unknown args".
    """
    if not args:
        return ""
    pairs = ["IgnoreUnknown=1", *(f"{key}={value}" for key, value in args.items())]
    return ";".join(pairs)


def plugin_binary(conf: Mapping[str, Any], cni_path: str = DEFAULT_CNI_PATH) -> Path:
    """The plugin executable named by ``conf["type"]`` under ``cni_path``."""
    plugin_type = conf.get("type")
    if not isinstance(plugin_type, str) or not plugin_type or "/" in plugin_type:
        raise HairtraceError(f"CNI config has no usable plugin type: {plugin_type!r}")
    binary = Path(cni_path) / plugin_type
    if not os.access(binary, os.X_OK):
        raise HairtraceError(f"CNI plugin {binary} not found or not executable")
    return binary


def _plugin_env(command: str, attachment: Attachment, cni_path: str) -> dict[str, str]:
    """The environment a CNI runtime passes to a plugin for one command."""
    env = dict(os.environ)
    env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID=attachment.container_id,
        CNI_NETNS=attachment.netns_path,
        CNI_IFNAME=attachment.ifname,
        CNI_PATH=cni_path,
        CNI_ARGS=cni_args(attachment.args),
    )
    return env


def _error_message(stdout: str, stderr: str) -> str:
    """The plugin's own error text: ``msg`` (+ ``details``) from its JSON error, else raw output."""
    try:
        err = json.loads(stdout)
    except ValueError:
        err = None
    if isinstance(err, dict) and "msg" in err:
        msg = str(err["msg"])
        if err.get("details"):
            msg += f": {err['details']}"
        return f"{msg} (code {err.get('code', '?')})"
    text = (stdout.strip() or stderr.strip() or "no output").splitlines()
    return text[0]


def invoke(
    command: str,
    conf: Mapping[str, Any],
    attachment: Attachment,
    *,
    run_in_netns: str,
    cni_path: str = DEFAULT_CNI_PATH,
) -> dict[str, Any]:
    """Run the plugin for ``command`` (ADD/DEL/CHECK) inside ``run_in_netns``; return its result.

    DEL and CHECK print nothing on success, so they return ``{}``.
    """
    if command not in ("ADD", "DEL", "CHECK"):
        raise HairtraceError(f"unsupported CNI command: {command}")
    binary = plugin_binary(conf, cni_path)
    proc = netns.run_in(
        run_in_netns,
        [str(binary)],
        input_text=json.dumps(conf),
        env=_plugin_env(command, attachment, cni_path),
        check=False,
    )
    if proc.returncode != 0:
        raise HairtraceError(
            f"CNI {conf['type']} {command} for {attachment.container_id} failed: "
            f"{_error_message(proc.stdout, proc.stderr)}"
        )
    if not proc.stdout.strip():
        return {}
    try:
        result = json.loads(proc.stdout)
    except ValueError as exc:
        raise HairtraceError(
            f"CNI {conf['type']} {command} for {attachment.container_id} printed non-JSON output"
        ) from exc
    if not isinstance(result, dict):
        raise HairtraceError(f"CNI {conf['type']} {command} result is not a JSON object")
    return result


def add(
    conf: Mapping[str, Any],
    attachment: Attachment,
    *,
    run_in_netns: str,
    cni_path: str = DEFAULT_CNI_PATH,
) -> dict[str, Any]:
    """CNI ADD: create the pod's interface and address; return the plugin's result."""
    return invoke("ADD", conf, attachment, run_in_netns=run_in_netns, cni_path=cni_path)


def delete(
    conf: Mapping[str, Any],
    attachment: Attachment,
    *,
    run_in_netns: str,
    cni_path: str = DEFAULT_CNI_PATH,
) -> None:
    """CNI DEL: remove the pod's interface and release its address (idempotent in the plugin)."""
    invoke("DEL", conf, attachment, run_in_netns=run_in_netns, cni_path=cni_path)


def result_addresses(result: Mapping[str, Any]) -> list[str]:
    """The addresses (CIDR form) in an ADD result, e.g. ["100.96.54.240/24"]."""
    ips = result.get("ips") or []
    return [str(ip["address"]) for ip in ips if isinstance(ip, dict) and "address" in ip]
