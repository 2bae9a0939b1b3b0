"""Transparent huge pages for a training process's large malloc blocks (glibc's ``hugetlb`` tunable).

A train step's temporaries are a few blocks per device that outgrow what a thread's malloc
arena can hold (64 MiB), so glibc maps each afresh with ``mmap`` on every step and unmaps it on
``free`` (``runtime.keep_freed_memory`` keeps every smaller block). In 4 KiB pages that is one
page fault, and the kernel zeroing the page, per 4 KiB written: an LSTM 2x512 at batch 64 on two
CPU devices took ~65k faults per step (bf16) and ~58k (float32). With
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc asks for transparent huge pages
(``madvise(MADV_HUGEPAGE)``) on what it maps, so the same blocks fault in 2 MiB at a time:
~1k faults per step; that step 12.7k -> 15.7k chars/s in bf16 and 7.5k -> 8.9k in float32,
peak RSS unchanged (675 -> 680 MB, 696 -> 693 MB).

glibc reads its tunables once, when the process starts, so ``charrnn train`` re-executes
itself with the tunable set (``rerun_env``; ``runtime.rerun_with_huge_pages``) before doing
anything else; a library user sets the variable before starting Python. Nothing happens where the C
library is not glibc 2.35 or later, where the kernel's THP mode is not ``madvise`` (``always``
already gives huge pages; ``never`` gives none), or where ``GLIBC_TUNABLES`` already says
anything about ``glibc.malloc.hugetlb`` (``glibc.malloc.hugetlb=0`` turns this off).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def running_libc() -> tuple:
    """``(name, version)`` of the C library this process runs on, ``("glibc", "2.36")`` say, from
    the library itself (``confstr``; ``platform.libc_ver()`` instead scans the Python binary's
    file for version strings); ``("", "")`` where it does not say."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (ValueError, OSError, AttributeError):
        return "", ""
    return name, version


def _glibc_has_tunable(libc: tuple) -> bool:
    name, version = libc
    if name != "glibc":
        return False
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)  # the release that added glibc.malloc.hugetlb


def asked(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's environment says anything about the tunable."""
    return TUNABLE in environ.get("GLIBC_TUNABLES", "")


def rerun_env(environ: Mapping[str, str] = os.environ, mode: Optional[str] = None,
              libc: Optional[tuple] = None) -> Optional[dict]:
    """The environment to re-run a training process in so that glibc maps its large blocks in
    transparent huge pages, or None where that would change nothing (see the module's text).

    ``mode`` and ``libc`` default to this machine's (``thp_mode()``, ``running_libc()``).
    """
    if not sys.platform.startswith("linux") or asked(environ):
        return None
    if (mode if mode is not None else thp_mode()) != "madvise":
        return None
    if not _glibc_has_tunable(libc if libc is not None else running_libc()):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1") if t)
    return env
