"""The runtime lab: the seed case with pods made by a real container runtime.

containerd (Debian's, its CRI plugin) runs inside the node netns `ht-rt`, with its own
root, state and socket under /run/hairtrace/lab/runtime, and creates two pod sandboxes
the way the kubelet asks for them (tracer.lab.cri): prod/curl-5c8d9-q7x2p (the client)
and prod/export-7d9f5-x2k8q (the backend). For each one the runtime creates the pod's
network namespace (/run/netns/cni-UUID), runs the CNI reference plugins (bridge cni0,
host-local) with K8S_POD_NAMESPACE / K8S_POD_NAME, and libcni caches the attachment in
/var/lib/cni/results: what hairtrace reads to name pods. The node then gets Service
prod/export (100.67.30.133:80) in kube-proxy's iptables shape, DNATing to the backend
pod, and net.bridge.bridge-nf-call-iptables as asked (0: the seed bug). The pause image is
built here from Debian's busybox-static (no registry).

Everything lives in network namespaces the lab creates (the node's, and the pods' that
containerd creates and removes); `down` stops the sandboxes through the CRI (CNI DEL),
stops containerd and removes the node netns and the lab's directories.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tracer.errors import HairtraceError
from tracer.lab import cluster, cni, netns, seed
from tracer.lab.cri import PodSpec, Runtime

NODE_NS = "ht-rt"
WORK = cluster.STATE_ROOT / "runtime"
STATE_FILE = cluster.STATE_ROOT / "runtime.json"
SOCKET = WORK / "containerd.sock"
PAUSE_IMAGE = "localhost/hairtrace-pause:1"
NETWORK = "hairtrace-pods"
SUBNET = "100.96.54.0/24"
CLIENT = PodSpec("prod", "curl-5c8d9-q7x2p", "5f0c7a36-client", labels={"app": "curl"})
BACKEND = PodSpec("prod", "export-7d9f5-x2k8q", "9b1e4d22-backend", labels={"app": "export"})
BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class Pod:
    pod: str  # namespace/name
    sandbox: str  # the runtime's sandbox id
    ip: str
    netns: str  # `ip netns` name of the sandbox's netns (cni-UUID)


@dataclass(frozen=True)
class RuntimeLab:
    node_ns: str = NODE_NS
    containerd_pid: int | None = None
    runtime: str = ""  # what the CRI Version call said
    pods: tuple[Pod, ...] = ()
    bridge_nf_call_iptables: int = 0

    @property
    def client(self) -> Pod:
        return self.pods[0]

    @property
    def backend(self) -> Pod:
        return self.pods[1]


def _save(lab: RuntimeLab) -> RuntimeLab:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = seed.temp_of(STATE_FILE)
    tmp.write_text(json.dumps(asdict(lab), indent=2) + "\n")
    tmp.replace(STATE_FILE)
    return lab


def load() -> RuntimeLab | None:
    """The runtime lab's state, None when there is none."""
    try:
        d = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return None
    pods = tuple(Pod(**p) for p in d.pop("pods", ()))
    return RuntimeLab(**{**d, "pods": pods})


def pause_image_archive() -> bytes:
    """A docker-archive image (what `ctr images import` reads): one layer with Debian's
    busybox-static as /bin/sleep, whose command sleeps forever, as a pause image does."""
    if not BUSYBOX.is_file():
        raise HairtraceError(f"{BUSYBOX} not found: install busybox-static (scripts/setup)")
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        d = tarfile.TarInfo("bin")
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(d)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        link = tarfile.TarInfo("bin/sleep")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
    layer_bytes = layer.getvalue()
    config = json.dumps({
        "architecture": "amd64" if os.uname().machine == "x86_64" else os.uname().machine,
        "os": "linux",
        "config": {"Cmd": ["/bin/sleep", "2147483647"]},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]},
    }).encode()  # fmt: skip
    manifest = json.dumps([{"Config": "config.json", "RepoTags": [PAUSE_IMAGE],
                            "Layers": ["layer.tar"]}]).encode()  # fmt: skip
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("layer.tar", layer_bytes), ("config.json", config),
                           ("manifest.json", manifest)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _containerd_config() -> str:
    # restrict_oom_score_adj: the sandbox's pause process may not lower its OOM score
    # below the caller's without CAP_SYS_RESOURCE (not held in every CI sandbox)
    return f"""version = 2
root = "{WORK}/root"
state = "{WORK}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{SOCKET}"
[ttrpc]
  address = "{SOCKET}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni.DEFAULT_CNI_PATH}"
    conf_dir = "{WORK}/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
"""


def _cni_conflist() -> str:
    return json.dumps({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": f"{WORK}/ipam"}},
            {"type": "loopback"},
        ],
    }, indent=2)  # fmt: skip


def _start_containerd() -> tuple[int, Runtime]:
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            raise HairtraceError(
                f"the runtime lab needs {tool}: install containerd (scripts/setup)"
            )
    (WORK / "net.d").mkdir(parents=True, exist_ok=True)
    (WORK / "config.toml").write_text(_containerd_config())
    (WORK / "net.d" / "10-hairtrace.conflist").write_text(_cni_conflist())
    log = open(WORK / "containerd.log", "ab")  # noqa: SIM115 - the daemon keeps it
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts runc needs
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns.NETNS_DIR / NODE_NS}", "containerd", "--config",
         str(WORK / "config.toml")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 30
    while not SOCKET.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise HairtraceError(f"containerd did not start: see {WORK / 'containerd.log'}")
        time.sleep(0.1)
    runtime = Runtime(str(SOCKET))
    archive = WORK / "pause.tar"
    archive.write_bytes(pause_image_archive())
    subprocess.run(["ctr", "-a", str(SOCKET), "-n", "k8s.io", "images", "import", str(archive)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return proc.pid, runtime


def _netns_name(path: str) -> str:
    name = Path(path).name
    if not path or not (netns.NETNS_DIR / name).exists():
        raise HairtraceError(f"the runtime gave the sandbox netns {path!r}, not in /run/netns")
    return name


def up(bridge_nf_call_iptables: int = 0) -> RuntimeLab:
    """Build the runtime lab (the seed case with pods made by containerd)."""
    seed._require_root()
    if STATE_FILE.exists() or netns.exists(NODE_NS):
        raise HairtraceError("a runtime lab already exists; run lab down first")
    shutil.rmtree(WORK, ignore_errors=True)
    lab = _save(RuntimeLab(bridge_nf_call_iptables=bridge_nf_call_iptables))
    try:
        netns.add(NODE_NS)
        netns.run_in(NODE_NS, ["ip", "link", "set", "lo", "up"])
        pid, runtime = _start_containerd()
        lab = _save(replace(lab, containerd_pid=pid, runtime=runtime.version()))
        try:
            for spec in (CLIENT, BACKEND):
                sid = runtime.run_pod_sandbox(spec, str(WORK / "logs" / spec.name))
                st = runtime.status(sid)
                pod = Pod(f"{st.namespace}/{st.name}", sid, st.ip, _netns_name(st.netns_path))
                lab = _save(replace(lab, pods=(*lab.pods, pod)))
        finally:
            runtime.close()
        backend = lab.backend
        rules = cluster.ClusterSpec(endpoints=(cluster.Endpoint(backend.ip, 80),), dns_endpoints=())
        netns.run_in(NODE_NS, ["iptables-restore", "-w", "5"],
                     input_text=cluster.iptables_rules(rules))  # fmt: skip
        if not netns.sysctl_exists(NODE_NS, seed.BRIDGE_NF_CALL_IPTABLES):
            raise HairtraceError(f"{seed.BRIDGE_NF_CALL_IPTABLES} does not exist in {NODE_NS}: "
                                 "load br_netfilter")  # fmt: skip
        netns.sysctl_write(NODE_NS, seed.BRIDGE_NF_CALL_IPTABLES, bridge_nf_call_iptables)
        _start_server(backend)
        _wait_server(lab)
        return lab
    except BaseException:
        down()
        raise


def _start_server(pod: Pod) -> None:
    argv = [sys.executable or "python3", "-I", str(Path(cluster.__file__).parent / "server.py"),
            "--bind", pod.ip, "--port", "80", "--name", pod.pod]  # fmt: skip
    with open(WORK / "server.log", "ab") as out:
        subprocess.run(["setsid", "-f", *netns.exec_argv(pod.netns, argv)],
                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True,
                       timeout=10)  # fmt: skip


def curl_argv(lab: RuntimeLab, url: str, timeout: float = 2.0) -> list[str]:
    """curl from the client pod, as the tests and the user run it."""
    return netns.exec_argv(lab.client.netns, ["curl", "-sS", "-m", f"{timeout:g}", "-o",
                                              "/dev/null", "-w", "%{http_code}", url])  # fmt: skip


def _wait_server(lab: RuntimeLab, timeout: float = 30.0) -> None:
    """Until the backend pod answers the client pod directly."""
    deadline = time.monotonic() + timeout
    while True:
        got = subprocess.run(curl_argv(lab, f"http://{lab.backend.ip}/", 1.0),
                             capture_output=True, text=True, check=False)  # fmt: skip
        if got.stdout.strip() == "200":
            return
        if time.monotonic() > deadline:
            raise HairtraceError(f"pod {lab.backend.pod} did not answer: {got.stderr.strip()}")
        time.sleep(0.2)


def down() -> list[str]:
    """Remove the runtime lab: sandboxes (through the CRI), containerd, the node netns."""
    lab = load()
    if lab is None and not netns.exists(NODE_NS) and not WORK.exists():
        return []
    seed._require_root()
    done: list[str] = []
    if lab is not None and lab.containerd_pid and SOCKET.exists():
        try:
            runtime = Runtime(str(SOCKET))
            try:
                for sid in runtime.list_pod_sandboxes():
                    runtime.stop_pod_sandbox(sid)  # CNI DEL: its cache entry goes too
                    runtime.remove_pod_sandbox(sid)
                    done.append(f"removed sandbox {sid[:12]}")
            finally:
                runtime.close()
        except HairtraceError as exc:
            done.append(f"sandboxes not removed: {exc}")
    if lab is not None:
        for pod in lab.pods:  # a server the sandbox's removal did not end
            for pid in netns.pids(pod.netns) if netns.exists(pod.netns) else []:
                seed._terminate(pid, grace=0.5)
            if netns.delete(pod.netns):
                done.append(f"deleted netns {pod.netns}")
    daemon = lab.containerd_pid if lab is not None else None
    if daemon and netns.pid_alive(daemon) and "containerd" in " ".join(netns.pid_cmdline(daemon)):
        seed._terminate(daemon)
        done.append(f"stopped containerd (pid {daemon})")
    for pid in netns.pids(NODE_NS) if netns.exists(NODE_NS) else []:
        seed._terminate(pid, grace=0.5)  # containerd's shims
    if netns.delete(NODE_NS):
        done.append(f"deleted netns {NODE_NS}")
    _unmount_under(WORK)
    shutil.rmtree(WORK, ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)
    return done


def _unmount_under(root: Path) -> None:
    """Unmount what containerd left mounted under its directories (shm, rootfs)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    points = [m.split()[1] for m in mounts if len(m.split()) > 1]
    for point in sorted((p for p in points if p.startswith(str(root) + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True, timeout=10)
