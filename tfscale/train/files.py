"""Crash-safe writes of the small files a run leaves in its workdir."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = [
    "write_json_atomic",
]


def write_json_atomic(path: str, value: Any) -> None:
    """Writes JSON so that readers see the old file or the new one, never half.

    Example:

    ```python
    write_json_atomic("/tmp/run/metrics.json", {"loss": 0.1})
    ```
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
