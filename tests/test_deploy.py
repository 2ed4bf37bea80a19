"""deploy/kubernetes/ and scripts/kubectl-hairtrace, without a cluster.

What is checked: every manifest against the Kubernetes API schemas (kubernetes-validate,
strict: an unknown field fails); the pods' security policy (no privileged, drop ALL and
add exactly the documented capabilities, each with its comment, host namespaces,
read-only host mounts, resources); that the DaemonSet's and the Job's pods agree; the
Job's container script (run here with sh and a stand-in hairtrace); and the plugin: the
manifest and the kubectl command lines its --dry-run prints, and its usage errors.

What is not: nothing here talks to a Kubernetes API server or a kubelet (none exists on
this machine); the pods themselves were run only as runc containers by hand.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
PLUGIN = REPO / "scripts" / "kubectl-hairtrace"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
# the oldest release with the appArmorProfile field, a middle one, the newest known
VERSIONS = ["1.30", "1.33", kubernetes_validate.latest_version()]

# The capabilities the pods add, each justified in a comment next to it and in the README.
CAPABILITIES = {"SYS_ADMIN", "BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_PTRACE", "SYSLOG"}
# host paths mounted read-only; the only writable one is the DaemonSet's session directory
READ_ONLY_HOST_PATHS = {
    "/sys/kernel/btf",
    "/run/netns",
    "/var/lib/cni",
}
SESSIONS = "/var/lib/hairtrace"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def obj(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs(path) if d["kind"] == kind]
    return found


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def the_container(spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = spec["containers"]
    assert not spec.get("initContainers")
    return dict(container)


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def quantity(text: str | int) -> float:
    """A Kubernetes quantity as a number (the suffixes used here)."""
    s = str(text)
    for suffix, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10), ("m", 1e-3)):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


def daemonset() -> dict[str, Any]:
    return obj(DEPLOY / "daemonset.yaml", "DaemonSet")


def job() -> dict[str, Any]:
    return obj(DEPLOY / "job.yaml", "Job")


# ---------------------------------------------------------------- schema validation


def test_the_expected_manifests_exist() -> None:
    names = {p.name for p in MANIFESTS}
    assert names == {"namespace.yaml", "rbac.yaml", "daemonset.yaml", "job.yaml"}
    kinds = sorted(d["kind"] for p in MANIFESTS for d in docs(p))
    assert kinds == sorted(
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
        + ["ConfigMap", "DaemonSet", "Job"]
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    for doc in docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_refuses_an_unknown_field() -> None:
    """The check above can fail: a misspelt field is refused."""
    bad = copy.deepcopy(job())
    the_container(pod_spec(bad))  # one container
    pod_spec(bad)["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- pod policy


def check_pod_policy(manifest: dict[str, Any], writable_host_paths: set[str]) -> None:
    """The policy of tests/test_deploy.py for one DaemonSet or Job (also a rendered one)."""
    for key, value in walk(manifest):
        if key == "privileged":
            assert value is False, "privileged must never be true"
    spec = pod_spec(manifest)
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert not spec.get("hostIPC")
    assert spec["serviceAccountName"] == "hairtrace"
    assert spec["automountServiceAccountToken"] is False, "no API use yet: no token"
    assert spec["securityContext"]["runAsUser"] == 0
    c = the_container(spec)
    assert c["image"] == f"hairtrace:{VERSION}" and c["imagePullPolicy"] == "IfNotPresent"
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = sc["capabilities"]["add"]
    assert len(added) == len(set(added)) and set(added) == CAPABILITIES
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    res = c["resources"]
    for kind in ("cpu", "memory"):
        assert quantity(res["requests"][kind]) > 0
        assert quantity(res["requests"][kind]) <= quantity(res["limits"][kind])
    # host paths: the listed ones read-only, nothing else but the allowed writable ones
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert set(host.values()) == READ_ONLY_HOST_PATHS | writable_host_paths
    for name, path in host.items():
        mount = mounts[name]
        if path in READ_ONLY_HOST_PATHS:
            assert mount.get("readOnly") is True, f"{path} must be mounted read-only"
        else:
            assert path in writable_host_paths
    netns = next(m for n, m in mounts.items() if host.get(n) == "/run/netns")
    assert netns["mountPropagation"] == "HostToContainer"
    assert mounts["tmp"]["mountPath"] == "/tmp"
    assert any(m["mountPath"] == SESSIONS for m in mounts.values())


def test_daemonset_policy() -> None:
    check_pod_policy(daemonset(), writable_host_paths={SESSIONS})


def test_job_policy() -> None:
    check_pod_policy(job(), writable_host_paths=set())
    sessions = next(v for v in pod_spec(job())["volumes"] if v["name"] == "sessions")
    assert "emptyDir" in sessions and quantity(sessions["emptyDir"]["sizeLimit"]) > 0


def test_policy_check_can_fail() -> None:
    """The policy check refuses what it is meant to refuse."""
    variants = []
    for mutate in (
        lambda c: c["securityContext"].update(privileged=True),
        lambda c: c["securityContext"]["capabilities"]["add"].append("SYS_MODULE"),
        lambda c: c["securityContext"]["capabilities"]["add"].remove("SYSLOG"),
        lambda c: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        lambda c: c["volumeMounts"][0].pop("readOnly"),
        lambda c: c["resources"].pop("limits"),
    ):
        m = copy.deepcopy(daemonset())
        mutate(pod_spec(m)["containers"][0])
        variants.append(m)
    for m in variants:
        with pytest.raises((AssertionError, KeyError)):
            check_pod_policy(m, writable_host_paths={SESSIONS})


def added_capability_lines(text: str) -> list[tuple[int, str]]:
    """(line number, capability) of every `- CAP` item under capabilities.add."""
    lines = text.splitlines()
    found, inside, indent = [], False, 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped == "add:":
            inside, indent = True, len(line) - len(line.lstrip())
            continue
        if inside:
            if stripped.startswith("#") or not stripped:
                continue
            if len(line) - len(line.lstrip()) <= indent:
                inside = False
                continue
            m = re.fullmatch(r"- ([A-Z_]+)\s*(#.*)?", stripped)
            assert m, f"unexpected line under add: {line!r}"
            found.append((i, m.group(1)))
    return found


@pytest.mark.parametrize("name", ["daemonset.yaml", "job.yaml"])
def test_each_added_capability_has_its_comment(name: str) -> None:
    lines = (DEPLOY / name).read_text().splitlines()
    items = added_capability_lines("\n".join(lines))
    assert {cap for _, cap in items} == CAPABILITIES
    for i, cap in items:
        block = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j])
            j -= 1
        inline = lines[i].split("#", 1)[1] if "#" in lines[i] else ""
        assert re.search(rf"\b{cap}\b", " ".join(block) + inline), (
            f"{name}: capability {cap} has no comment naming it right above it"
        )


def test_readme_table_names_each_capability() -> None:
    text = (DEPLOY / "README.md").read_text()
    rows = re.findall(r"^\| `(?:CAP_)?([A-Z_]+)` \|", text, re.MULTILINE)
    assert set(rows) == CAPABILITIES and len(rows) == len(CAPABILITIES)
    assert "not run" in text.lower()


def test_daemonset_and_job_pods_agree() -> None:
    ds, jb = pod_spec(daemonset()), pod_spec(job())
    for key in ("hostNetwork", "hostPID", "tolerations", "serviceAccountName",
                "automountServiceAccountToken", "securityContext", "enableServiceLinks"):  # fmt: skip
        assert ds.get(key) == jb.get(key), key
    cd, cj = the_container(ds), the_container(jb)
    for key in ("image", "imagePullPolicy", "securityContext", "resources", "volumeMounts"):
        assert cd[key] == cj[key], key
    volumes = {v["name"]: v for v in ds["volumes"]}, {v["name"]: v for v in jb["volumes"]}
    assert volumes[0].keys() == volumes[1].keys()
    for name in volumes[0]:
        if name != "sessions":
            assert volumes[0][name] == volumes[1][name], name


def test_namespace_and_rbac() -> None:
    ns = obj(DEPLOY / "namespace.yaml", "Namespace")
    assert ns["metadata"]["name"] == "hairtrace"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for path in MANIFESTS:
        for d in docs(path):
            if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                assert d["metadata"]["namespace"] == "hairtrace", (path.name, d["kind"])
    role = obj(DEPLOY / "rbac.yaml", "ClusterRole")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        (g, r, v)
        for g, r in (("", "services"), ("", "pods"), ("discovery.k8s.io", "endpointslices"))
        for v in ("get", "list", "watch")
    }
    binding = obj(DEPLOY / "rbac.yaml", "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "hairtrace", "namespace": "hairtrace"}
    ]
    assert obj(DEPLOY / "rbac.yaml", "ServiceAccount")["metadata"]["name"] == "hairtrace"


def test_daemonset_command_uses_real_options() -> None:
    from tracer.cli import main as cli

    options = {opt for p in cli.params for opt in p.opts}
    c = the_container(pod_spec(daemonset()))
    assert c["command"] == ["hairtrace"]
    args = c["args"]
    assert {a for a in args if a.startswith("--")} <= options
    assert args[args.index("--svc") + 1] == "$(HAIRTRACE_SVC)"
    assert args[args.index("--record") + 1].startswith(SESSIONS + "/")
    env = {e["name"]: e for e in c["env"]}
    ref = env["HAIRTRACE_SVC"]["valueFrom"]["configMapKeyRef"]
    cm = obj(DEPLOY / "daemonset.yaml", "ConfigMap")
    assert cm["metadata"]["name"] == ref["name"] and ref["key"] in cm["data"]
    # the Job's script too
    script = job_script()
    for opt in re.findall(r"(?<![\w-])--[a-z][a-z-]+", script):
        assert opt in options, opt


# ---------------------------------------------------------------- the Job's container script


def job_script() -> str:
    command = the_container(pod_spec(job()))["command"]
    assert command[:2] == ["sh", "-c"]
    return str(command[2])


def kube_expand(text: str, names: set[str]) -> str:
    """Kubernetes' expansion of command/args: $$ -> $, $(NAME) -> value, else unchanged."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (end := text.find(")", i)) > 0:
            name = text[i + 2 : end]
            out.append(f"<{name}>" if name in names else text[i : end + 1])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def test_job_script_is_not_touched_by_kubernetes_expansion() -> None:
    env = {e["name"] for e in the_container(pod_spec(job()))["env"]}
    assert kube_expand(job_script(), env) == job_script()


def run_job_script(tmp_path: Path, hairtrace_rc: int) -> tuple[int, list[str], Path]:
    """The Job's script under sh, its data directory in tmp_path, a stand-in hairtrace that
    records its arguments, writes a session and exits hairtrace_rc. Returns the script's
    exit status, hairtrace's arguments and the data directory."""
    data, bin_ = tmp_path / "data", tmp_path / "bin"
    data.mkdir()
    bin_.mkdir()
    fake = bin_ / "hairtrace"
    fake.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {shlex.quote(str(tmp_path / "argv"))}\n'
        f"echo session > {shlex.quote(str(data / 'session.hts'))}\n"
        f"exit {hairtrace_rc}\n"
    )
    fake.chmod(0o755)
    script = job_script()
    assert "out=/var/lib/hairtrace\n" in script
    script = script.replace("out=/var/lib/hairtrace\n", f"out={shlex.quote(str(data))}\n")
    env = {e["name"]: e.get("value", "") for e in the_container(pod_spec(job()))["env"]}
    env |= {"HAIRTRACE_SVC": "prod/export:http", "HAIRTRACE_DURATION": "7"}
    env |= {"PATH": f"{bin_}:/usr/bin:/bin"}
    proc = subprocess.Popen(["sh", "-c", script], env=env)
    probe = the_container(pod_spec(job()))["readinessProbe"]["exec"]["command"]
    assert probe == ["cat", f"{SESSIONS}/exit-code"]
    deadline = time.monotonic() + 20
    while not (data / "exit-code").exists():  # what the readiness probe waits for
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the container must wait for the copy"
    (data / "fetched").touch()  # what the plugin does after kubectl cp
    rc = proc.wait(timeout=10)
    assert (data / "exit-code").read_text().strip() == str(hairtrace_rc)
    return rc, (tmp_path / "argv").read_text().splitlines(), data


def test_job_script_waits_for_the_copy_and_completes_on_a_broken_verdict(tmp_path: Path) -> None:
    rc, argv, _ = run_job_script(tmp_path, hairtrace_rc=3)
    assert rc == 0  # 3 = a broken connection was found: the trace worked, the Job completes
    assert argv == ["--no-live", "--svc", "prod/export:http", "--duration", "7", "--record",
                    str(tmp_path / "data" / "session.hts")]  # fmt: skip


def test_job_script_fails_when_hairtrace_fails(tmp_path: Path) -> None:
    rc, _, _ = run_job_script(tmp_path, hairtrace_rc=1)
    assert rc == 1


# ---------------------------------------------------------------- the plugin


def plugin(*args: str, path: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = dict(os.environ)
    env.pop("HAIRTRACE_JOB_TEMPLATE", None)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, str(PLUGIN), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def fake_kubectl(tmp_path: Path, node: str = "worker-7") -> tuple[str, Path]:
    """A stand-in kubectl, only for the pod -> node lookup that --dry-run does run: it logs
    its arguments and answers `get pod NAME -n NS -o jsonpath={.spec.nodeName}` with node;
    anything else fails (exit 99), so a dry run that ran any other command fails its test."""
    bin_ = tmp_path / "fakebin"
    bin_.mkdir()
    log = tmp_path / "kubectl.log"
    script = bin_ / "kubectl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {shlex.quote(str(log))}\n'
        'if [ "$1 $2 $4" = "get pod -n" ] && [ "$6 $7" = "-o jsonpath={.spec.nodeName}" ]; then\n'
        f"  printf %s {shlex.quote(node)}; exit 0\n"
        "fi\n"
        "exit 99\n"
    )
    script.chmod(0o755)
    return f"{bin_}:{os.environ.get('PATH', '')}", log


def parse_dry_run(text: str) -> tuple[dict[str, Any], list[list[str]]]:
    """(the manifest it would apply, the kubectl command lines in order)."""
    assert text.startswith("#!/bin/sh\n")
    manifest_text = text.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    (manifest,) = [d for d in yaml.safe_load_all(manifest_text) if d]
    commands = []
    for line in text.splitlines():
        line = line.removeprefix("pod=$(").removesuffix(")")
        if line.startswith("kubectl "):
            words = shlex.split(line.split(" <<'EOF'")[0])
            commands.append(words)
    return manifest, commands


def env_of(manifest: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in the_container(pod_spec(manifest))["env"]}


@pytest.mark.parametrize("version", VERSIONS)
def test_dry_run_manifest_validates_and_is_filled_in(tmp_path: Path, version: str) -> None:
    path, log = fake_kubectl(tmp_path)
    res = plugin("node", "worker-1", "--svc", "prod/export:http", "--duration", "45",
                 "--dry-run", path=path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert not log.exists(), "a dry run for a node runs no kubectl at all"
    manifest, _ = parse_dry_run(res.stdout)
    kubernetes_validate.validate(manifest, version, strict=True)
    check_pod_policy(manifest, writable_host_paths=set())
    spec = pod_spec(manifest)
    assert spec["nodeName"] == "worker-1"
    assert env_of(manifest)["HAIRTRACE_SVC"] == "prod/export:http"
    assert env_of(manifest)["HAIRTRACE_DURATION"] == "45"
    name = manifest["metadata"]["name"]
    assert re.fullmatch(r"hairtrace-worker-1-\d{10}", name)
    assert manifest["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == name
    body = [ln for ln in yaml.safe_dump(manifest).splitlines() if not ln.lstrip().startswith("#")]
    for token in ("JOB_NAME", "NODE_NAME", "SVC_SPEC", "DURATION_S"):
        assert not any(token in ln for ln in body), token


def test_dry_run_commands(tmp_path: Path) -> None:
    res = plugin("node", "worker-1", "--svc", "10.96.0.10:53/udp", "--duration", "45",
                 "--out", str(tmp_path / "s.hts"), "--dry-run")  # fmt: skip
    assert res.returncode == 0, res.stderr
    manifest, cmds = parse_dry_run(res.stdout)
    job_name = manifest["metadata"]["name"]
    verbs = [c[1] for c in cmds]
    assert verbs == ["apply", "get", "wait", "exec", "logs", "exec", "cp", "exec", "wait", "delete"]
    apply, find, ready, status, logs, size, cp, fetched, complete, delete = cmds
    ns = ["-n", "hairtrace"]
    assert apply == ["kubectl", "apply", "-f", "-"]
    assert find == ["kubectl", "get", "pods", *ns, "-l", f"app.kubernetes.io/instance={job_name}",
                    "-o", "jsonpath={.items[0].metadata.name}"]  # fmt: skip
    # Ready = the container wrote its exit status; the timeout covers start, the trace, the end
    assert ready == ["kubectl", "wait", "--for=condition=Ready", "pod/$pod", *ns,
                     f"--timeout={300 + 45 + 120}s"]  # fmt: skip
    probe = the_container(pod_spec(manifest))["readinessProbe"]["exec"]["command"]
    in_pod = ["kubectl", "exec", *ns, "$pod", "-c", "hairtrace", "--"]
    assert status == [*in_pod, *probe]
    assert logs == ["kubectl", "logs", *ns, "$pod", "-c", "hairtrace"]
    assert size == [*in_pod, "wc", "-c", f"{SESSIONS}/session.hts"]
    assert cp == ["kubectl", "cp", "--retries=5", "-c", "hairtrace",
                  f"hairtrace/$pod:{SESSIONS}/session.hts", str(tmp_path / "s.hts")]  # fmt: skip
    assert fetched == [*in_pod, "touch", f"{SESSIONS}/fetched"]
    assert '"$out/fetched"' in job_script() and '--record "$out/session.hts"' in job_script()
    assert complete == ["kubectl", "wait", "--for=condition=complete", f"job/{job_name}", *ns,
                        "--timeout=120s"]  # fmt: skip
    assert delete == ["kubectl", "delete", "job", job_name, *ns, "--wait=false"]
    assert env_of(manifest)["HAIRTRACE_SVC"] == "10.96.0.10:53/udp"


def test_dry_run_pod_looks_up_its_node(tmp_path: Path) -> None:
    path, log = fake_kubectl(tmp_path, node="worker-7")
    res = plugin("pod", "web-0", "-n", "prod", "--svc", "prod/export", "--dry-run", path=path)
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == ["get pod web-0 -n prod -o jsonpath={.spec.nodeName}"]
    manifest, _ = parse_dry_run(res.stdout)
    assert pod_spec(manifest)["nodeName"] == "worker-7"
    assert env_of(manifest)["HAIRTRACE_DURATION"] == "30"  # the default
    assert "# already run (read-only): kubectl get pod web-0" in res.stdout


def test_dry_run_pod_not_scheduled(tmp_path: Path) -> None:
    path, _ = fake_kubectl(tmp_path, node="")
    res = plugin("pod", "web-0", "--svc", "prod/export", "--dry-run", path=path)
    assert res.returncode == 1
    assert "not scheduled" in res.stderr and res.stdout == ""


def test_dry_run_svc_on_a_node() -> None:
    res = plugin("svc", "export:http/tcp", "-n", "prod", "--node", "worker-2", "--dry-run")
    assert res.returncode == 0, res.stderr
    manifest, _ = parse_dry_run(res.stdout)
    assert env_of(manifest)["HAIRTRACE_SVC"] == "prod/export:http/tcp"
    assert pod_spec(manifest)["nodeName"] == "worker-2"


def test_dry_run_image_override() -> None:
    res = plugin("node", "w1", "--svc", "prod/export", "--image", "reg.example/ht:0.1.0",
                 "--dry-run")  # fmt: skip
    manifest, _ = parse_dry_run(res.stdout)
    assert the_container(pod_spec(manifest))["image"] == "reg.example/ht:0.1.0"


def test_dry_run_debug_mode(tmp_path: Path) -> None:
    out = tmp_path / "d.hts"
    res = plugin("node", "worker-1", "--svc", "prod/export", "--duration", "20", "--debug",
                 "--out", str(out), "--dry-run")  # fmt: skip
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("kubectl ")]
    words, redirect = line.rsplit(" > ", 1)
    assert shlex.split(redirect) == [str(out)]
    argv = shlex.split(words)
    cut = argv.index("--")
    assert argv[:cut] == ["kubectl", "debug", "node/worker-1", "-n", "hairtrace",
                          "--profile=sysadmin", f"--image=hairtrace:{VERSION}",
                          "--image-pull-policy=IfNotPresent", "-i", "--quiet"]  # fmt: skip
    assert argv[cut + 1 : cut + 3] == ["sh", "-c"]
    assert argv[cut + 4 :] == ["hairtrace", "prod/export", "20"]
    script = argv[cut + 3]
    assert 'hairtrace --no-live --svc "$1" --duration "$2" --record /tmp/session.hts >&2' in script
    assert "cat /tmp/session.hts" in script  # the session is the only standard output
    assert "app.kubernetes.io/managed-by=kubectl-debug" in res.stdout  # how to clean up


@pytest.mark.optional
def test_dry_run_commands_parse_with_real_kubectl(tmp_path: Path) -> None:
    """The real kubectl accepts every command line's flags: pointed at a closed port on
    the loopback, each fails only because nobody answers."""
    import shutil

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: none\n"
        "clusters: [{name: none, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "users: [{name: none, user: {token: x}}]\n"
        "contexts: [{name: none, context: {cluster: none, user: none}}]\n"
    )
    lines: list[tuple[list[str], str]] = []
    for debug in ([], ["--debug"]):
        res = plugin("node", "w1", "--svc", "prod/export", *debug, "--out",
                     str(tmp_path / "o.hts"), "--dry-run")  # fmt: skip
        assert res.returncode == 0, res.stderr
        if debug:
            line = next(ln for ln in res.stdout.splitlines() if ln.startswith("kubectl "))
            lines.append((shlex.split(line.rsplit(" > ", 1)[0]), ""))
        else:
            manifest, cmds = parse_dry_run(res.stdout)
            lines += [(c, yaml.safe_dump(manifest) if c[1] == "apply" else "") for c in cmds]
    assert len(lines) == 11
    env = dict(os.environ, KUBECONFIG=str(config))
    for argv, stdin in lines:
        argv = [kubectl, *[a.replace("$pod", "hairtrace-w1-abcde") for a in argv[1:]]]
        res2 = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env,
                              timeout=60, check=False)  # fmt: skip
        assert res2.returncode != 0
        assert "127.0.0.1:9" in res2.stderr, (argv, res2.stderr[-300:])
        assert "unknown flag" not in res2.stderr and "unknown shorthand" not in res2.stderr


BAD_USAGE = [
    [],
    ["pod"],
    ["pods", "web-0", "--svc", "prod/export"],
    ["pod", "web-0"],
    ["pod", "Web_0", "--svc", "prod/export"],
    ["svc", "export", "-n", "prod"],
    ["svc", "export", "--node", "w1", "--svc", "prod/export"],
    ["svc", "Export!", "--node", "w1"],
    ["node", "Worker_1", "--svc", "prod/export"],
    ["node", "w1", "--svc", "prod/export", "--node", "w2"],
    ["node", "w1", "--svc", "a b"],
    ["node", "w1", "--svc", "prod/export", "--duration", "0"],
    ["node", "w1", "--svc", "prod/export", "--duration", "3601"],
    ["node", "w1", "--svc", "prod/export", "--duration", "ten"],
    ["node", "w1", "--svc", "prod/export", "-n", "Bad_NS"],
    ["node", "w1", "--svc", "prod/export", "--bogus"],
    ["node", "w1", "--svc", "prod/export", "--template", "/nonexistent/job.yaml"],
]


@pytest.mark.parametrize("args", BAD_USAGE, ids=lambda a: " ".join(a) or "(none)")
def test_bad_usage_exits_2_with_one_line(tmp_path: Path, args: list[str]) -> None:
    path, log = fake_kubectl(tmp_path)
    res = plugin(*args, path=path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kubectl-hairtrace: error: "), res.stderr
    assert not log.exists(), "bad usage runs no kubectl"


def test_existing_out_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "s.hts"
    out.write_text("old")
    path, log = fake_kubectl(tmp_path)
    res = plugin("node", "w1", "--svc", "prod/export", "--out", str(out), path=path)
    assert res.returncode == 2 and "--force" in res.stderr and len(res.stderr.splitlines()) == 1
    assert out.read_text() == "old" and not log.exists()


def test_template_without_a_placeholder_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text((DEPLOY / "job.yaml").read_text().replace("nodeName: NODE_NAME", "nodeName: x"))
    res = plugin("node", "w1", "--svc", "prod/export", "--template", str(bad), "--dry-run")
    assert res.returncode == 2 and "NODE_NAME" in res.stderr


def test_help() -> None:
    res = plugin("--help")
    assert res.returncode == 0
    assert "kubectl hairtrace pod POD" in res.stdout and "--dry-run" in res.stdout
    assert os.access(PLUGIN, os.X_OK)
