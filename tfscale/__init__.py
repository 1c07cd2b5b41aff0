"""tfscale: scale Keras training on TensorFlow from one device to many hosts.

The names below are imported on first use, so that the command-line tools
that need no TensorFlow (`tfscale-launch`, `tfscale-dispatcher`) start fast.
No submodule shares a name with an export: importing a submodule binds its
name on the package, which would shadow a function of that name.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "DevicesAlreadyInitializedError": "tfscale.devices",
    "Distribution": "tfscale.distribution_base",
    "LayoutMap": "tfscale.sharding.layout_map",
    "configure_devices": "tfscale.devices",
    "distribution": "tfscale.distributions",
    "kinds": "tfscale.distributions",
    "local_devices": "tfscale.devices",
}
# subpackage name -> module
_SUBPACKAGES = {
    "sharding": "tfscale.sharding",
}

__all__ = [
    "DevicesAlreadyInitializedError",
    "Distribution",
    "LayoutMap",
    "configure_devices",
    "distribution",
    "kinds",
    "local_devices",
    "sharding",
]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        value = importlib.import_module(_SUBPACKAGES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'tfscale' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
