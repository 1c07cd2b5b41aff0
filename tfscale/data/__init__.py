"""Input data: the embedded synthetic set, TFRecord shards, TFDS, the dispatcher.

`SplitData` and `load_split` are imported on first use: the dispatcher
subpackage must not pull in TensorFlow.
"""

import importlib
from typing import Any

_EXPORTS = {
    "SplitData": "tfscale.data.sources",
    "load_split": "tfscale.data.sources",
}

__all__ = [
    "SplitData",
    "load_split",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfscale.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
