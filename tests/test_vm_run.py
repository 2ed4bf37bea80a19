"""scripts/vm-run: real boots of a Debian 6.1 kernel under qemu (TCG), plus its error paths.

Each boot takes roughly 5-15 s here; the first one in a fresh cache also
downloads and unpacks the kernel package (about 20 s more). Tests that boot
need root and qemu-system-x86_64 (scripts/setup installs it): they skip
without them locally and fail under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT, needs_root, require

VM_RUN = REPO_ROOT / "scripts" / "vm-run"
QEMU = "qemu-system-x86_64"


def vm_run(*args: str, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None, timeout=300):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [str(VM_RUN), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture(scope="module")
def booted() -> subprocess.CompletedProcess[bytes]:
    """`vm-run -- uname -r`, once root and qemu are known to be there.

    The first boot also fills the kernel cache if it is empty (download,
    unpack, initramfs), so the tests after it see exact stderr.
    """
    needs_root()
    require(shutil.which(QEMU), f"needs {QEMU} (apt-get install qemu-system-x86; scripts/setup)")
    return vm_run("--", "uname", "-r")


def test_uname_is_the_debian_61_kernel(booted: subprocess.CompletedProcess[bytes]) -> None:
    assert booted.returncode == 0, booted.stderr.decode()
    assert re.fullmatch(rb"6\.1\.0-\d+-amd64\n", booted.stdout), booted.stdout
    assert booted.stdout.decode().strip() != os.uname().release


def test_stdout_is_exact(booted: object) -> None:
    res = vm_run("--", "printf", "a\\nb\\n")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"a\nb\n", b"")


def test_exit_status_and_raw_bytes_on_both_streams(booted: object) -> None:
    # no trailing newline, CR, NUL; stderr kept apart from stdout; exit 7
    script = r"printf 'x\r\ny\0z'; printf 'oops\n' >&2; exit 7"
    res = vm_run("--", "sh", "-c", script)
    assert (res.returncode, res.stdout, res.stderr) == (7, b"x\r\ny\0z", b"oops\n")


def test_guest_sees_host_paths_and_keeps_cwd(booted: object, tmp_path: Path) -> None:
    # Host /tmp (like every host path) is visible read-only; the guest's
    # writes land in its tmpfs overlay and never reach the host.
    (tmp_path / "hello.txt").write_text("from the host\n")
    script = 'cat hello.txt; pwd; echo guest >written.txt; cat written.txt; echo "$HOME"'
    res = vm_run("--", "sh", "-c", script, cwd=tmp_path)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().splitlines() == ["from the host", str(tmp_path), "guest", "/root"]
    assert not (tmp_path / "written.txt").exists()


def test_environment_passes_ci_and_hairtrace_vars_only(booted: object) -> None:
    env = {**os.environ, "CI": "true", "HAIRTRACE_X": "1 2", "UNRELATED_VAR": "no"}
    res = vm_run("-e", "EXTRA=yes", "--", "env", env=env)
    assert res.returncode == 0, res.stderr.decode()
    lines = res.stdout.decode().splitlines()
    for want in ("CI=true", "HAIRTRACE_X=1 2", "EXTRA=yes", "HOME=/root"):
        assert want in lines
    assert not any(line.startswith("UNRELATED_VAR=") for line in lines)
    assert any(line.startswith("PATH=") and "/usr/sbin" in line for line in lines)


LAB_SCRIPT = r"""
set -e
ip netns add x
ip link add br0 type bridge
ip link add v0 type veth peer name v1 netns x
ip link set v0 master br0
ip addr add 10.77.0.1/24 dev br0
ip link set br0 up; ip link set v0 up
ip -n x addr add 10.77.0.2/24 dev v1
ip -n x link set v1 up
iptables -t nat -A POSTROUTING -s 10.77.0.0/24 -j MASQUERADE
iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
# neither is preloaded by vm-run: the kernel must load them on demand
iptables -A INPUT -p tcp -m multiport --dports 7,9 -j ACCEPT
ip link add vx0 type vxlan id 42 dstport 4789 dev lo
ip netns exec x bash -c 'echo hi >/dev/udp/10.77.0.1/9'
sleep 0.2
echo "conntrack $(cat /proc/sys/net/netfilter/nf_conntrack_count)"
echo "bridge-nf $(cat /proc/sys/net/bridge/bridge-nf-call-iptables)"
for m in xt_multiport vxlan br_netfilter nft_compat; do
    grep -q "^$m " /proc/modules && echo "module $m"
done
echo ok
"""


def test_netns_bridge_nat_conntrack_and_module_autoload(booted: object) -> None:
    res = vm_run("--", "bash", "-c", LAB_SCRIPT)
    assert res.returncode == 0, res.stderr.decode()
    out = res.stdout.decode().splitlines()
    assert out[-1] == "ok"
    count = int(next(line.split()[1] for line in out if line.startswith("conntrack ")))
    assert count >= 1, out
    assert "bridge-nf 1" in out
    for m in ("xt_multiport", "vxlan", "br_netfilter", "nft_compat"):
        assert f"module {m}" in out


def test_foreign_script_runs_unchanged(booted: object, tmp_path: Path) -> None:
    # a script written for a normal machine, not for the VM
    script = tmp_path / "scenario.sh"
    script.write_text(
        "#!/bin/sh\nset -e\n"
        "python3 -c 'import sys; print(sys.version)'\n"
        "ls /sys/kernel/btf/vmlinux\n"
        "mount | grep -c ' /sys/fs/bpf ' \n"
    )
    script.chmod(0o755)
    host_version = subprocess.run(
        ["python3", "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    res = vm_run("--", str(script))
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode() == f"{host_version}/sys/kernel/btf/vmlinux\n1\n"


def test_project_venv_imports_tracer(booted: object) -> None:
    res = vm_run("--", ".venv/bin/python", "-c", "import tracer; print('ok')")
    assert (res.returncode, res.stdout) == (0, b"ok\n"), res.stderr.decode()


def test_boot_timeout_reports_the_console(booted: object) -> None:
    env = {**os.environ, "HAIRTRACE_VM_BOOT_TIMEOUT": "1"}
    res = vm_run("--", "true", env=env)
    err = res.stderr.decode()
    assert res.returncode == 125
    assert err.startswith("vm-run: error: the guest did not come up within 1 s\n"), err
    assert "Traceback" not in err


def test_timeout_kills_the_guest(booted: object) -> None:
    res = vm_run("--timeout", "12", "--", "sleep", "600", timeout=120)
    err = res.stderr.decode()
    assert res.returncode == 124, err
    assert err == "vm-run: error: timed out after 12 s (--timeout); killed qemu\n"


# ------------------------------------------------------- errors without a boot


def one_line_error(res: subprocess.CompletedProcess[bytes]) -> str:
    err = res.stderr.decode()
    assert res.returncode != 0
    assert err.count("\n") == 1 and err.startswith("vm-run: error: "), err
    return err


def test_unknown_kernel_package(booted: object) -> None:
    res = vm_run("--kernel", "linux-image-0.0.0-0-nosuch", "--", "true")
    err = one_line_error(res)
    assert "no such kernel package: linux-image-0.0.0-0-nosuch" in err
    assert res.stdout == b""


def test_missing_qemu(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # a PATH without qemu
    err = one_line_error(vm_run("--", "true", env=env))
    assert QEMU in err and "qemu-system-x86" in err


def test_missing_command() -> None:
    for args in ([], ["--"], ["--mem", "512", "--"]):
        err = one_line_error(vm_run(*args))
        assert "missing command after '--'" in err


def test_help() -> None:
    res = vm_run("--help")
    assert res.returncode == 0
    assert b"usage: scripts/vm-run" in res.stdout and b"--kernel" in res.stdout
