"""What the processor is: its model name and feature flags, from /proc/cpuinfo (Linux; empty elsewhere)."""

from __future__ import annotations

from pathlib import Path


def cpuinfo_text(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    try:
        return Path(cpuinfo).read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo is absent."""
    for line in cpuinfo_text(cpuinfo).splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The processor's model name, or "" where /proc/cpuinfo names none."""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo_text(cpuinfo).splitlines()
                 if line.startswith("model name")), "")
