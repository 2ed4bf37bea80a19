"""Kernel cache for scripts/vm-run: a Debian kernel package, unpacked, plus its initramfs.

Layout of <cache>/<package>/ (default cache /var/cache/hairtrace/vm, or $HAIRTRACE_VM_CACHE):

    <package>_<version>_amd64.deb   what `apt-get download` fetched
    root/                           `dpkg-deb -x` of it, modules indexed by `depmod -b`;
                                    root/boot/vmlinux-<release>: the ELF kernel taken out of
                                    vmlinuz, booted through PVH (skips the decompression,
                                    seconds under TCG) when the kernel has CONFIG_PVH
    release                         the kernel release (uname -r), written last: "unpacked"
    initrd-<hash>.cpio.gz           busybox-static + scripts/vm/init + the modules to
                                    mount a 9p root; <hash> covers everything that went in

Everything is built in a temporary name and renamed into place, under an
exclusive lock (<cache>/.lock), so concurrent runs wait for each other
and a second run only reads.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = "/var/cache/hairtrace/vm"
METAPACKAGE = "linux-image-amd64"
BUSYBOX = "/bin/busybox"
# insmod'ed in this order by scripts/vm/init (their dependencies first); the
# ones built into the kernel or missing from it are left out.
INITRD_MODULES = [
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_console", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay",
]  # fmt: skip
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
APT_OPTS = ["-q", "-o", "APT::Sandbox::User=root", "-o", "DPkg::Lock::Timeout=300"]


class VMError(Exception):
    """A failure to report on one line."""


@dataclass(frozen=True)
class Kernel:
    package: str
    release: str  # uname -r of the guest
    vmlinuz: Path  # what qemu -kernel gets: boot/vmlinux-<release> if there, else vmlinuz
    initrd: Path
    moddir: Path  # root/lib/modules/<release>

    def loadable(self, names: list[str]) -> list[str]:
        """The names among `names` that are modules (not built in, not absent) of this kernel."""
        have = _module_index(self.moddir)
        return [n for n in names if _norm(n) in have]


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_index(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """module name -> (relative path, its dependencies' relative paths) from modules.dep."""
    index = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        name = _norm(os.path.basename(path).split(".ko")[0])
        index[name] = (path, deps.split())
    return index


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=APT_ENV, check=False)
    except FileNotFoundError:
        raise VMError(f"{what}: '{cmd[0]}' not found (run scripts/setup)") from None
    return res


def _apt_lists_empty() -> bool:
    return not glob.glob("/var/lib/apt/lists/*_Packages*")


def _apt_update() -> None:
    res = _run(["apt-get", *APT_OPTS, "update"], "apt-get update")
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        raise VMError(f"apt-get update failed: {last}")


def _lists_stamp() -> str:
    files = sorted(glob.glob("/var/lib/apt/lists/*_Packages*"))
    return hashlib.sha256(repr([(f, os.stat(f).st_mtime_ns) for f in files]).encode()).hexdigest()


def resolve_package(spec: str | None, cache: str | None = None) -> str:
    """The kernel package for --kernel `spec`: a package name, a release, or None (current)."""
    if spec:
        spec = spec.strip()
        if spec.startswith("linux-image-"):
            return spec
        if re.fullmatch(r"\d+\.\d+\.\d+-\d+", spec):  # 6.1.0-28
            spec += "-amd64"
        return f"linux-image-{spec}"
    if _apt_lists_empty():
        _apt_update()
    # apt-cache takes a second or two: remember its answer until the lists change
    memo = _cache_dir(cache) / f"{METAPACKAGE}.resolved"
    stamp = _lists_stamp()
    try:
        old_stamp, package = memo.read_text().split()
        if old_stamp == stamp:
            return package
    except (OSError, ValueError):
        pass
    res = _run(["apt-cache", "depends", METAPACKAGE], "apt-cache")
    m = re.search(r"^\s*Depends:\s*(linux-image-\S+)", res.stdout, re.MULTILINE)
    if res.returncode != 0 or not m:
        raise VMError(f"cannot resolve {METAPACKAGE} with apt-cache (is this Debian?)")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(f"{stamp} {m.group(1)}\n")
        tmp.rename(memo)
    except OSError:
        pass
    return m.group(1)


def _cache_dir(cache: str | None) -> Path:
    return Path(cache or os.environ.get("HAIRTRACE_VM_CACHE") or DEFAULT_CACHE)


@contextmanager
def _locked(path: Path):  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download(package: str, pkgdir: Path, log) -> Path:  # type: ignore[no-untyped-def]
    debs = sorted(pkgdir.glob("*.deb"))
    if debs:
        return debs[-1]
    if _apt_lists_empty():
        _apt_update()
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=pkgdir.parent))
    try:
        cmd = ["apt-get", *APT_OPTS, "download", package]
        res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=APT_ENV, check=False)
        if (
            "Unable to locate package" in res.stderr
            or "has no installation candidate" in res.stderr
        ):
            raise VMError(f"no such kernel package: {package}")
        got = list(tmp.glob("*.deb"))
        if res.returncode != 0 or len(got) != 1:
            last = (res.stderr.strip().splitlines() or ["?"])[-1]
            raise VMError(f"apt-get download {package} failed: {last}")
        pkgdir.mkdir(exist_ok=True)
        log(f"downloaded {got[0].name} ({got[0].stat().st_size >> 20} MiB)")
        return got[0].rename(pkgdir / got[0].name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpack(deb: Path, pkgdir: Path, log) -> str:  # type: ignore[no-untyped-def]
    log(f"unpacking {deb.name}")
    tmp = Path(tempfile.mkdtemp(prefix=".root-", dir=pkgdir))
    try:
        res = _run(["dpkg-deb", "-x", str(deb), str(tmp)], "dpkg-deb")
        if res.returncode != 0:
            raise VMError(f"dpkg-deb -x {deb} failed: {res.stderr.strip()}")
        releases = [p.name for p in (tmp / "lib/modules").glob("*")]
        if len(releases) != 1 or not (tmp / f"boot/vmlinuz-{releases[0]}").is_file():
            raise VMError(f"{deb.name} is not a kernel image package (no boot/vmlinuz-*)")
        release = releases[0]
        res = _run(["depmod", "-b", str(tmp), release], "depmod")
        if res.returncode != 0:
            raise VMError(f"depmod -b {tmp} {release} failed: {res.stderr.strip()}")
        _extract_vmlinux(tmp, release)
        shutil.rmtree(pkgdir / "root", ignore_errors=True)
        tmp.rename(pkgdir / "root")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (pkgdir / "release").write_text(release + "\n")
    return release


def _extract_vmlinux(root: Path, release: str) -> None:
    """Write boot/vmlinux-<release> (ELF, bootable by qemu through PVH) if vmlinuz allows."""
    config = root / f"boot/config-{release}"
    if not config.is_file() or "\nCONFIG_PVH=y\n" not in config.read_text():
        return
    data = (root / f"boot/vmlinuz-{release}").read_bytes()
    for magic, make in (
        (b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
        (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    ):
        at = data.find(magic)
        if at < 0:
            continue
        try:
            elf = make().decompress(data[at:])
        except (lzma.LZMAError, zlib.error):
            continue
        if elf[:4] == b"\x7fELF":
            (root / f"boot/vmlinux-{release}").write_bytes(elf)
            return


def _build_initrd(pkgdir: Path, release: str, init_script: Path, log) -> Path:  # type: ignore[no-untyped-def]
    moddir = pkgdir / "root/lib/modules" / release
    index = _module_index(moddir)
    order: list[str] = []  # relative paths, dependencies first

    def add(relpath: str) -> None:
        if relpath in order:
            return
        name = _norm(os.path.basename(relpath).split(".ko")[0])
        for dep in reversed(index[name][1]):  # modules.dep lists the deepest last
            add(dep)
        order.append(relpath)

    for name in INITRD_MODULES:
        if name in index:  # else built in, or not in this kernel at all
            add(index[name][0])
    if not Path(BUSYBOX).is_file() or b"ld-linux" in Path(BUSYBOX).read_bytes()[:4096]:
        raise VMError(f"{BUSYBOX} missing or not static: apt-get install busybox-static")

    digest = hashlib.sha256()
    for part in [init_script, Path(BUSYBOX), *(moddir / p for p in order)]:
        digest.update(part.read_bytes())
    initrd = pkgdir / f"initrd-{digest.hexdigest()[:16]}.cpio.gz"
    if initrd.is_file():
        return initrd
    log(f"building {initrd.name}")
    with tempfile.TemporaryDirectory(dir=pkgdir, prefix=".initrd-") as tmp:
        top = Path(tmp) / "root"
        for d in ("bin", "dev", "proc", "sys", "modules"):
            (top / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, top / "bin/busybox")
        shutil.copy2(init_script, top / "init")
        os.chmod(top / "init", 0o755)
        for rel in order:
            shutil.copy2(moddir / rel, top / "modules" / os.path.basename(rel))
        (top / "modules.order").write_text("".join(os.path.basename(r) + "\n" for r in order))
        out = Path(tmp) / "initrd"
        script = "find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1"
        with open(out, "wb") as fh:
            res = subprocess.run(
                ["sh", "-c", script], cwd=top, stdout=fh, stderr=subprocess.PIPE, check=False
            )
        if res.returncode != 0:
            raise VMError(
                f"building the initramfs failed (cpio, gzip): {res.stderr.decode().strip()}"
            )
        out.rename(initrd)
    for old in pkgdir.glob("initrd-*.cpio.gz"):  # another checkout may still use a recent one
        if old != initrd and time.time() - old.stat().st_mtime > 86400:
            old.unlink(missing_ok=True)
    return initrd


def prepare(package: str, init_script: Path, cache: str | None = None, log=print) -> Kernel:  # type: ignore[no-untyped-def]
    """Download, unpack and index `package` and build its initramfs, once; return the kernel."""
    base = _cache_dir(cache)
    if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", package):
        raise VMError(f"no such kernel package: {package}")
    pkgdir = base / package
    with _locked(base / ".lock"):
        release_file = pkgdir / "release"
        if release_file.is_file() and (pkgdir / "root").is_dir():
            release = release_file.read_text().strip()
        else:
            release = _unpack(_download(package, pkgdir, log), pkgdir, log)
        initrd = _build_initrd(pkgdir, release, init_script, log)
    boot = pkgdir / "root/boot"
    vmlinux = boot / f"vmlinux-{release}"
    return Kernel(
        package=package,
        release=release,
        vmlinuz=vmlinux if vmlinux.is_file() else boot / f"vmlinuz-{release}",
        initrd=initrd,
        moddir=pkgdir / "root/lib/modules" / release,
    )
