"""Input data: the embedded synthetic set, TFRecord shards and TFDS."""

from tfscale.data.sources import SplitData
from tfscale.data.sources import load_split

__all__ = [
    "SplitData",
    "load_split",
]
