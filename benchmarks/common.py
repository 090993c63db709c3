"""What every benchmark prints about the machine it ran on, so ratios can be compared honestly."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["cpu_model", "describe_machine", "usable_cores"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def usable_cores() -> int:
    """Cores this process may run on (a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def describe_machine(packages: Sequence[str], gpu: str = "none", torch_threads: int | None = None) -> str:
    """One line: cores, CPU, RAM, GPU, Python and the versions of the packages that matter."""
    threads = f", {torch_threads} torch threads" if torch_threads is not None else ""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    libs = ", ".join(f"{p} {_version(p)}" for p in packages)
    return (f"{os.cpu_count()} cores ({usable_cores()} usable{threads}), CPU {cpu_model()}, {ram:.0f} GiB RAM, "
            f"GPU {gpu}; python {platform.python_version()}, {libs}")
