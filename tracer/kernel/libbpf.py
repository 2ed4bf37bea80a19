"""A small typed ctypes binding over the system libbpf (libbpf.so.1).

Only what hairtrace needs: open an object, set its rodata config, choose and
retype programs, load, attach (tp_btf through libbpf, netfilter hooks through
the raw bpf(2) syscall that libbpf 1.1 lacks), read maps, drain a ring buffer.
Errors become HairtraceError carrying libbpf's own log lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tracer.errors import HairtraceError

BPF_PROG_TYPE_NETFILTER = 32
LIBBPF_DEBUG = 2  # enum libbpf_print_level: WARN 0, INFO 1, DEBUG 2
BPF_NETFILTER = 45
BPF_MAP_TYPE_RINGBUF = 27
BPF_LINK_CREATE = 28
NFPROTO_IPV4 = 2
CLONE_NEWNET = 0x40000000
_NR_BPF = {"x86_64": 321, "aarch64": 280}

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
RINGBUF_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


@dataclass
class _Log:
    """libbpf's messages, kept to explain a failure (verifier output included)."""

    lines: list[str] = field(default_factory=list)

    def tail(self, n: int = 12) -> str:
        text = "".join(self.lines[-n:]).strip()
        return f"\n{text}" if text else ""


class NetfilterBusy(HairtraceError):
    """EBUSY from BPF_LINK_CREATE: another BPF netfilter link holds this (netns, pf, hook,
    priority) (net/netfilter/core.c allows one per priority); a caller may try another."""

    def __init__(self, message: str, hook: int, priority: int) -> None:
        super().__init__(message)
        self.hook = hook
        self.priority = priority


class Libbpf:
    """The loaded shared library with typed signatures; one per process is enough."""

    def __init__(self, path: str | None = None) -> None:
        name = path or ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            self.lib = ctypes.CDLL(name, use_errno=True)
            self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError as exc:
            raise HairtraceError(f"cannot load libbpf ({name}): {exc}; install libbpf1") from exc
        self.log = _Log()
        self._print_buf = ctypes.create_string_buffer(65536)  # one message at a time
        self._declare()
        self._print_cb = _PRINT_FN(self._on_print)
        self.lib.libbpf_set_print(self._print_cb)

    def _declare(self) -> None:
        vp, cp, i, u = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint
        sigs: dict[str, tuple[object, list[object]]] = {
            "libbpf_set_print": (vp, [_PRINT_FN]),
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__load": (i, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__next_program": (vp, [vp, vp]),
            "bpf_object__next_map": (vp, [vp, vp]),
            "bpf_program__name": (cp, [vp]),
            "bpf_program__section_name": (cp, [vp]),
            "bpf_program__set_autoload": (i, [vp, ctypes.c_bool]),
            "bpf_program__set_type": (i, [vp, u]),
            "bpf_program__set_expected_attach_type": (i, [vp, u]),
            "bpf_program__fd": (i, [vp]),
            "bpf_program__attach": (vp, [vp]),
            "bpf_link__destroy": (i, [vp]),
            "bpf_map__name": (cp, [vp]),
            "bpf_map__fd": (i, [vp]),
            "bpf_map__initial_value": (vp, [vp, ctypes.POINTER(ctypes.c_size_t)]),
            "bpf_map__value_size": (ctypes.c_uint32, [vp]),
            "bpf_map__set_max_entries": (i, [vp, ctypes.c_uint32]),
            "bpf_map__max_entries": (ctypes.c_uint32, [vp]),
            "bpf_map_lookup_elem": (i, [i, vp, vp]),
            "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
            "libbpf_probe_bpf_map_type": (i, [u, vp]),
            "libbpf_num_possible_cpus": (i, []),
            "btf__parse": (vp, [cp, vp]),
            "btf__parse_split": (vp, [cp, vp]),
            "btf__find_by_name_kind": (i, [vp, cp, u]),
            "btf__free": (None, [vp]),
            "ring_buffer__new": (vp, [i, RINGBUF_CB, vp, vp]),
            "ring_buffer__poll": (i, [vp, i]),
            "ring_buffer__consume": (i, [vp]),
            "ring_buffer__free": (None, [vp]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(self.lib, name)
            fn.restype = res
            fn.argtypes = args
        self.libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, vp]
        self.libc.syscall.restype = ctypes.c_long
        self.libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

    def _on_print(self, level: int, fmt: bytes, args: int | None) -> int:
        # libbpf's debug messages (thousands per load: CO-RE relocations) explain nothing
        # a warning does not: formatting each cost ~50 ms of every start
        if level == LIBBPF_DEBUG:
            return 0
        buf = self._print_buf
        self.libc.vsnprintf(buf, len(buf), fmt, args)
        self.log.lines.append(buf.value.decode(errors="replace"))
        del self.log.lines[:-400]
        return 0

    def errno_error(self, what: str) -> HairtraceError:
        err = ctypes.get_errno()
        hint = (
            " (not permitted: needs root with CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN, which"
            " entering other network namespaces needs anyway; in a container, the default"
            " seccomp profile refuses bpf() without CAP_SYS_ADMIN)"
            if err == errno.EPERM
            else ""
        )
        return HairtraceError(f"{what}: {os.strerror(err)}{hint}{self.log.tail()}")

    def btf_ids(
        self, path: str, names: set[str], kind: int, base: str | None = None
    ) -> dict[str, int]:
        """Type ids of the named types of one kind in a BTF file (libbpf's parser, ~10x
        faster than Python's); a module's BTF needs the vmlinux BTF as base. Names not
        found are left out."""
        base_btf = self.lib.btf__parse(base.encode(), None) if base else None
        if base and not base_btf:
            return {}
        btf = (
            self.lib.btf__parse_split(path.encode(), base_btf)
            if base_btf
            else self.lib.btf__parse(path.encode(), None)
        )
        try:
            if not btf:
                return {}
            ids = {n: self.lib.btf__find_by_name_kind(btf, n.encode(), kind) for n in names}
        finally:
            self.lib.btf__free(btf)
            self.lib.btf__free(base_btf)
        return {n: i for n, i in ids.items() if i > 0}

    def probe_map_type(self, map_type: int) -> bool:
        return self.map_type_status(map_type) == 1

    def map_type_status(self, map_type: int) -> int:
        """libbpf_probe_bpf_map_type: 1 supported, 0 not, -errno when bpf() failed (e.g.
        -EPERM: not permitted, which a seccomp profile also gives)."""
        return int(self.lib.libbpf_probe_bpf_map_type(map_type, None))

    def bpf_syscall(self, cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
        nr = _NR_BPF.get(platform.machine())
        if nr is None:
            raise HairtraceError(f"bpf(2) syscall number unknown for {platform.machine()}")
        ret = int(self.libc.syscall(nr, cmd, attr, len(attr)))
        return ret if ret >= 0 else -ctypes.get_errno()


class BpfObject:
    """An opened (then loaded) BPF object file and the links attached from it."""

    def __init__(self, lib: Libbpf, path: str, btf_custom_path: str | None = None) -> None:
        self.lib = lib
        self.path = path
        lib.log.lines.clear()
        opts = None
        if btf_custom_path:
            # struct bpf_object_open_opts up to btf_custom_path (libbpf.h): sz at 0,
            # btf_custom_path at 48; a shorter sz is how older callers pass it.
            opts = ctypes.create_string_buffer(56)
            self._btf_path = ctypes.create_string_buffer(btf_custom_path.encode())
            ctypes.c_size_t.from_buffer(opts, 0).value = 56
            ctypes.c_void_p.from_buffer(opts, 48).value = ctypes.addressof(self._btf_path)
        self.obj = lib.lib.bpf_object__open_file(path.encode(), opts)
        if not self.obj:
            raise lib.errno_error(f"cannot open BPF object {path}")
        self.links: list[tuple[str, Callable[[], None]]] = []

    # --- before load -------------------------------------------------------
    def programs(self) -> Iterator[tuple[str, str, int]]:
        """(name, section, handle) of each program."""
        prog = self.lib.lib.bpf_object__next_program(self.obj, None)
        while prog:
            name = self.lib.lib.bpf_program__name(prog).decode()
            sec = self.lib.lib.bpf_program__section_name(prog).decode()
            yield name, sec, prog
            prog = self.lib.lib.bpf_object__next_program(self.obj, prog)

    def _prog(self, name: str) -> int:
        for pname, _sec, handle in self.programs():
            if pname == name:
                return handle
        raise HairtraceError(f"BPF object {self.path} has no program {name}")

    def select(self, names: set[str]) -> None:
        """Load only these programs."""
        for pname, _sec, handle in self.programs():
            self.lib.lib.bpf_program__set_autoload(handle, pname in names)

    def make_netfilter(self, name: str) -> None:
        prog = self._prog(name)
        self.lib.lib.bpf_program__set_type(prog, BPF_PROG_TYPE_NETFILTER)
        self.lib.lib.bpf_program__set_expected_attach_type(prog, BPF_NETFILTER)

    def _map(self, suffix: str) -> int:
        m = self.lib.lib.bpf_object__next_map(self.obj, None)
        while m:
            if self.lib.lib.bpf_map__name(m).decode().endswith(suffix):
                return int(m)
            m = self.lib.lib.bpf_object__next_map(self.obj, m)
        raise HairtraceError(f"BPF object {self.path} has no map {suffix}")

    def set_rodata(self, data: bytes, offset: int = 0) -> None:
        """Write the loader's configuration into .rodata before load."""
        size = ctypes.c_size_t()
        ptr = self.lib.lib.bpf_map__initial_value(self._map(".rodata"), ctypes.byref(size))
        if not ptr or offset + len(data) > size.value:
            raise HairtraceError("BPF object's .rodata is missing or too small for the config")
        ctypes.memmove(ptr + offset, data, len(data))

    def set_max_entries(self, suffix: str, n: int) -> None:
        if self.lib.lib.bpf_map__set_max_entries(self._map(suffix), n) != 0:
            raise self.lib.errno_error(f"resizing BPF map {suffix} to {n}")

    def load(self) -> None:
        self.lib.log.lines.clear()
        if self.lib.lib.bpf_object__load(self.obj) != 0:
            raise self.lib.errno_error("loading the BPF programs failed")

    # --- after load --------------------------------------------------------
    def map_fd(self, suffix: str) -> int:
        return int(self.lib.lib.bpf_map__fd(self._map(suffix)))

    def map_max_entries(self, suffix: str) -> int:
        """max_entries of a map (for a ring buffer: its data size in bytes)."""
        return int(self.lib.lib.bpf_map__max_entries(self._map(suffix)))

    def update_elem(self, suffix: str, key: bytes, value: bytes) -> None:
        """Put one element into a map of the loaded object (BPF_ANY)."""
        fd = self.map_fd(suffix)
        if self.lib.lib.bpf_map_update_elem(fd, key, value, 0) != 0:
            raise self.lib.errno_error(f"updating BPF map {suffix}")

    def lookup_percpu(self, suffix: str, key: int = 0) -> list[bytes]:
        """One element of a per-CPU array map: its value on each possible CPU."""
        m = self._map(suffix)
        cpus = int(self.lib.lib.libbpf_num_possible_cpus())
        if cpus <= 0:
            raise HairtraceError(f"libbpf_num_possible_cpus: {os.strerror(-cpus)}")
        size = int(self.lib.lib.bpf_map__value_size(m))
        stride = (size + 7) // 8 * 8  # the kernel rounds each CPU's copy up to 8 bytes
        k = ctypes.c_uint32(key)
        buf = ctypes.create_string_buffer(stride * cpus)
        if self.lib.lib.bpf_map_lookup_elem(self.lib.lib.bpf_map__fd(m), ctypes.byref(k), buf):
            raise self.lib.errno_error(f"reading BPF map {suffix}")
        return [buf.raw[i * stride : i * stride + size] for i in range(cpus)]

    def read_global(self, suffix: str) -> bytes:
        """The whole value of a global-data map (.bss, .data): a consistent copy."""
        m = self._map(suffix)
        size = int(self.lib.lib.bpf_map__value_size(m))
        key = ctypes.c_uint32(0)
        buf = ctypes.create_string_buffer(size)
        if self.lib.lib.bpf_map_lookup_elem(self.lib.lib.bpf_map__fd(m), ctypes.byref(key), buf):
            raise self.lib.errno_error(f"reading BPF map {suffix}")
        return buf.raw

    def attach(self, name: str) -> None:
        """Attach a program the way its section says (tp_btf, fentry, kprobe...)."""
        link = self.lib.lib.bpf_program__attach(self._prog(name))
        if not link:
            raise self.lib.errno_error(f"attaching {name}")
        self.links.append((name, lambda: self.lib.lib.bpf_link__destroy(link) and None))

    def attach_netfilter(self, name: str, netns_path: str, hook: int, priority: int) -> None:
        """Create a BPF netfilter link in the network namespace at netns_path.

        The link binds to the caller thread's netns, so the thread enters the
        target netns for the one syscall and returns at once. A priority another
        BPF netfilter link holds raises NetfilterBusy; any other failure HairtraceError.
        """
        prog_fd = self.lib.lib.bpf_program__fd(self._prog(name))
        attr = ctypes.create_string_buffer(64)
        for off, val in ((0, prog_fd), (8, BPF_NETFILTER), (16, NFPROTO_IPV4), (20, hook)):
            ctypes.c_uint32.from_buffer(attr, off).value = val
        ctypes.c_int32.from_buffer(attr, 24).value = priority
        with _in_netns(self.lib, netns_path):
            fd = self.lib.bpf_syscall(BPF_LINK_CREATE, attr)
        if fd < 0:
            what = (
                f"attaching netfilter program {name} (hook {hook}, priority {priority}) "
                f"in {netns_path}: {os.strerror(-fd)}"
            )
            if -fd == errno.EBUSY:  # the one error a different priority can cure
                raise NetfilterBusy(what, hook, priority)
            raise HairtraceError(what)
        self.links.append((name, lambda: os.close(fd)))

    def detach_all(self) -> None:
        while self.links:
            _name, destroy = self.links.pop()
            destroy()

    def close(self) -> None:
        self.detach_all()
        if self.obj:
            self.lib.lib.bpf_object__close(self.obj)
            self.obj = None


@contextmanager
def _in_netns(lib: Libbpf, path: str) -> Iterator[None]:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if lib.libc.setns(target, CLONE_NEWNET) != 0:
            raise lib.errno_error(f"entering network namespace {path}")
        try:
            yield
        finally:
            if lib.libc.setns(own, CLONE_NEWNET) != 0:
                raise lib.errno_error("returning to the original network namespace")
    finally:
        os.close(target)
        os.close(own)


class RingBuffer:
    """Drains a BPF ring buffer in batches into a callback taking raw records.

    One ctypes callback per record; tracer.kernel.ringbuf reads the map directly
    and uses this only where that is not safe.
    """

    def __init__(self, lib: Libbpf, map_fd: int, on_records: Callable[[list[bytes]], None]) -> None:
        self.lib = lib
        self._batch: list[bytes] = []
        self._on_records = on_records

        def _sample(_ctx: int, data: int, size: int) -> int:
            self._batch.append(ctypes.string_at(data, size))
            return 0

        self._cb = RINGBUF_CB(_sample)
        self.rb = lib.lib.ring_buffer__new(map_fd, self._cb, None, None)
        if not self.rb:
            raise lib.errno_error("creating the ring buffer reader")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms (the BPF side batches wake-ups), then drain all."""
        n = self.lib.lib.ring_buffer__poll(self.rb, timeout_ms)
        if n < 0 and -n != errno.EINTR:
            raise HairtraceError(f"reading the ring buffer: {os.strerror(-n)}")
        self.lib.lib.ring_buffer__consume(self.rb)
        return self.flush()

    def flush(self) -> int:
        batch, self._batch = self._batch, []
        if batch:
            self._on_records(batch)
        return len(batch)

    def close(self) -> None:
        if self.rb:
            self.lib.lib.ring_buffer__free(self.rb)
            self.rb = None
