"""Where the BPF files are: the CO-RE object libbpf loads and the source bcc compiles.

There are two builds of the one source: ``hairtrace.bpf.o`` reads packet headers and
conntrack tuples with direct loads (bpf_rdonly_cast, Linux 6.2+), ``hairtrace-copy.bpf.o``
copies them with a helper, for older kernels; the loader asks for the one the kernel
can run (``direct``). The object is looked up in this order:

1. ``$HAIRTRACE_BPF_OBJ`` (when set, it alone: a missing file there is an error);
2. the repository checkout this package runs from, ``bpf/build/<object>``
   (an editable install, or PYTHONPATH=CHECKOUT), built by ``make -C bpf``;
3. the copy a wheel carries, ``tracer/bpf/<object>`` (put there by
   scripts/build-wheel), so a node needs no clang or kernel headers.

The bcc backend's source (hairtrace.bpf.c and the headers it includes, compat.h
and hairtrace.h) comes from the checkout's ``bpf/``, else from the wheel's copy.
"""

from __future__ import annotations

import os
from pathlib import Path

from tracer.errors import HairtraceError

ENV = "HAIRTRACE_BPF_OBJ"
OBJECT = "hairtrace.bpf.o"  # direct reads (Linux 6.2+)
COPY_OBJECT = "hairtrace-copy.bpf.o"  # helper copies (older kernels)
OBJECTS = (OBJECT, COPY_OBJECT)
SOURCE = "hairtrace.bpf.c"
BCC_SOURCES = (SOURCE, "compat.h", "hairtrace.h")  # what bcc reads (-I the source's dir)

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the installed `tracer` package
CHECKOUT_BPF = PACKAGE_DIR.parent / "bpf"  # <checkout>/bpf, when running from a checkout
PACKAGED_BPF = PACKAGE_DIR / "bpf"  # the wheel's copies (scripts/build-wheel)


def find_object(direct: bool = True) -> tuple[Path, str]:
    """The BPF object to load (direct reads, else helper copies) and where it was found
    ("HAIRTRACE_BPF_OBJ", "checkout" or "package"); a one-line HairtraceError saying what
    to do when there is none."""
    name = OBJECT if direct else COPY_OBJECT
    env = os.environ.get(ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise HairtraceError(
                f"BPF object {path} ({ENV}) not found: point {ENV} at a built {OBJECT} or unset it"
            )
        return path, ENV
    looked: list[Path] = []
    if CHECKOUT_BPF.is_dir():  # running from a checkout (an installed package has no ../bpf)
        checkout = CHECKOUT_BPF / "build" / name
        if checkout.is_file():
            return checkout, "checkout"
        looked.append(checkout)
    packaged = PACKAGED_BPF / name
    if packaged.is_file():
        return packaged, "package"
    looked.append(packaged)
    raise HairtraceError(
        f"BPF object {name} not found (looked at {' and '.join(map(str, looked))}): in a "
        f"checkout run scripts/setup (make -C bpf); elsewhere install a wheel built by "
        f"scripts/build-wheel, or set {ENV}"
    )


def object_path(direct: bool = True) -> Path:
    return find_object(direct)[0]


def find_source() -> tuple[Path, str]:
    """hairtrace.bpf.c for bcc (its headers beside it) and where it was found ("checkout"
    or "package")."""
    places = [("checkout", CHECKOUT_BPF)] if CHECKOUT_BPF.is_dir() else []
    places.append(("package", PACKAGED_BPF))
    for where, base in places:
        if all((base / name).is_file() for name in BCC_SOURCES):
            return base / SOURCE, where
    raise HairtraceError(
        f"BPF source {SOURCE} with {', '.join(BCC_SOURCES[1:])} not found (looked in "
        f"{' and '.join(str(base) for _, base in places)}): reinstall hairtrace from a wheel "
        "built by scripts/build-wheel"
    )


def source_path() -> Path:
    return find_source()[0]
