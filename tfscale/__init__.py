"""tfscale: scale Keras training on TensorFlow from one device to many hosts.

The names below are imported on first use, so that the command-line tools
that need no TensorFlow (`tfscale-launch`, `tfscale-dispatcher`) start fast.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "DevicesAlreadyInitializedError": "tfscale.devices",
    "Distribution": "tfscale.distribution",
    "configure_devices": "tfscale.devices",
    "distribution": "tfscale.distribution",
    "kinds": "tfscale.distribution",
    "local_devices": "tfscale.devices",
}

__all__ = [
    "DevicesAlreadyInitializedError",
    "Distribution",
    "configure_devices",
    "distribution",
    "kinds",
    "local_devices",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfscale' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
