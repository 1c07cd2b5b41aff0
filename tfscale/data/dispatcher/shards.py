"""Shard names: expanding a spec into the shards of a job.

A shard name says what to read (`tfscale.data.readers` reads them):

- a file path: a TFRecord file;
- `range:A:B`: the integers A..B-1 (tests and benchmarks);
- `tfds:NAME:SPLIT[a%:b%]`: a slice of a TFDS split.

Example:

```python
shards = expand("range:100:25")  # 4 shards: range:0:25, ..., range:75:100
shards[1].name                   # 'range:25:50'
```
"""

from __future__ import annotations

import os

from tfscale.data.dispatcher import types

__all__ = [
    "MAX_TFDS_SLICES",
    "expand",
    "range_bounds",
]

# A TFDS split is sliced by whole percents.
MAX_TFDS_SLICES = 100


def expand(spec: str, count_elements: bool = False) -> list[types.ShardSpec]:
    """Shards of a spec: a file glob, `range:N:K` or `tfds:NAME:SPLIT:N`.

    Args:
      spec: the spec.
      count_elements: size file shards by their record count (read once)
        rather than their bytes; equalization needs element counts.

    Raises:
      ValueError: for a malformed spec or a glob matching no file.
    """
    if spec.startswith("range:"):
        total, size = _ints(spec)
        if size < 1:
            raise ValueError(f"Shard size must be positive. Received: {spec!r}")
        return [
            types.ShardSpec(f"range:{start}:{min(start + size, total)}", min(size, total - start))
            for start in range(0, total, size)
        ]
    if spec.startswith("tfds:"):
        parts = spec.split(":")
        if len(parts) != 4 or not parts[3].isdigit() or not 1 <= int(parts[3]) <= MAX_TFDS_SLICES:
            raise ValueError(
                f"Expected tfds:NAME:SPLIT:N with N in [1, {MAX_TFDS_SLICES}]. Received: {spec!r}"
            )
        _, name, split, count = parts
        edges = [round(100 * i / int(count)) for i in range(int(count) + 1)]
        return [
            types.ShardSpec(f"tfds:{name}:{split}[{a}%:{b}%]", b - a)
            for a, b in zip(edges, edges[1:])
        ]
    import tensorflow as tf  # Only file shards need TensorFlow.

    files = sorted(tf.io.gfile.glob(spec))
    if not files:
        raise ValueError(f"No file matches the shard glob {spec!r}")
    if count_elements:
        from tfscale.data import records

        return [types.ShardSpec(f, n) for f, n in zip(files, records.shard_counts(files))]
    return [types.ShardSpec(f, os.path.getsize(f)) for f in files]


def range_bounds(name: str) -> tuple[int, int]:
    """`(A, B)` of a `range:A:B` shard name.

    Raises:
      ValueError: for a name that is not `range:A:B` with integers 0 <= A <= B.
    """
    parts = name.split(":")
    if (
        len(parts) != 3
        or parts[0] != "range"
        or not (parts[1].isdigit() and parts[2].isdigit())
        or int(parts[1]) > int(parts[2])
    ):
        raise ValueError(
            f"Expected a range:A:B shard name with integers 0 <= A <= B. Received: {name!r}"
        )
    return int(parts[1]), int(parts[2])


def _ints(spec: str) -> tuple[int, int]:
    """The two integers of `range:N:K`."""
    parts = spec.split(":")[1:]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"Expected 2 integers in {spec!r}")
    return int(parts[0]), int(parts[1])
