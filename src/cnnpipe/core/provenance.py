"""The environment a result was made in, for the provenance (info) files every stage writes."""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path
from typing import Any

INSTALLED_LOCK = "uv.lock"  # `make setup` copies the lock it installed into the venv (sys.prefix)


def environment(prefix: str | Path = sys.prefix) -> dict[str, Any]:
    """Python, platform and the sha256 of the uv.lock the environment was installed from (null when it was
    not installed by `make setup`, e.g. a plain `pip install`)."""
    lock = Path(prefix) / INSTALLED_LOCK
    digest = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None
    return {"uv_lock_sha256": digest, "python": platform.python_version(),
            "platform": f"{sys.platform}-{platform.machine()}"}
