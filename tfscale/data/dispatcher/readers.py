"""Shard readers: a shard's name (a `tf.string` tensor) -> a `tf.data.Dataset`.

`tfscale.data.dispatched.DispatchedInput` reads each leased shard with a
reader, inside tf.data: elements never pass through Python. Any function of
that shape is a reader; these cover the shard names tfscale makes:

- `tfrecord(parse)`: TFRecord files, each record parsed by `parse` (any
  schema); a `ShardReader`, whose parse runs after the shards are merged;
- `records(image_shape)`: tfscale's image-classification record format;
- `ranges()`: `range:A:B` shards, the integers A..B-1 (tests, benchmarks);
- `datasets(by_name)`: shards whose datasets are built up front, e.g. TFDS
  split slices (`tfds_slices`).

Example (a user's own schema):

```python
features = {"text": tf.io.FixedLenFeature([], tf.string),
            "score": tf.io.FixedLenFeature([], tf.float32)}
reader = readers.tfrecord(lambda r: tf.io.parse_single_example(r, features))
data = dispatched.DispatchedInput("127.0.0.1:40123", "train", reader)
```
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import tensorflow as tf

from tfscale.data import records as records_lib

__all__ = [
    "Reader",
    "ShardReader",
    "datasets",
    "ranges",
    "records",
    "tfds_slices",
    "tfrecord",
]

class ShardReader:
    """A reader in two steps: `read` a shard's raw elements, then `parse` each.

    `DispatchedInput` parses after the shards' elements were merged into one
    stream, with one parallel map over all of them (as plain tf.data does
    after its interleave), instead of one map per shard. Calling it reads
    and parses one shard, so it is also a plain `Reader`.
    """

    def __init__(
        self,
        read: Callable[[tf.Tensor], tf.data.Dataset],
        parse: Callable[..., Any] | None = None,
    ):
        self.read = read
        self.parse = parse

    def __call__(self, name: tf.Tensor) -> tf.data.Dataset:
        dataset = self.read(name)
        if self.parse is None:
            return dataset
        return dataset.map(self.parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


Reader = Callable[[tf.Tensor], tf.data.Dataset]


def tfrecord(
    parse: Callable[[tf.Tensor], Any] | None = None, buffer_size: int | None = None
) -> ShardReader:
    """Reads a TFRecord file, parsing each record with `parse` (None: raw records).

    Args:
      parse: serialized record (a scalar `tf.string`) -> element.
      buffer_size: the file reader's read buffer, bytes (TFRecordDataset's default if None).
    """
    return ShardReader(lambda name: tf.data.TFRecordDataset(name, buffer_size=buffer_size), parse)


def records(image_shape: Sequence[int]) -> ShardReader:
    """Reads tfscale's record format (`tfscale.data.records`): {"image", "label", "id"}."""
    return tfrecord(records_lib.parse_fn(tuple(image_shape)))


def ranges() -> Reader:
    """Reads `range:A:B` shards: the int64s A..B-1."""

    def read(name: tf.Tensor) -> tf.data.Dataset:
        bounds = tf.strings.to_number(tf.strings.split(name, ":")[1:3], tf.int64)
        return tf.data.Dataset.range(bounds[0], bounds[1])

    return read


def datasets(by_name: Mapping[str, tf.data.Dataset]) -> Reader:
    """Reads shards whose datasets are built up front, by name.

    The datasets must share one element spec. A name not among them fails
    the input pipeline with an error naming it.

    Raises:
      ValueError: for no datasets, or datasets of different element specs.
    """
    if not by_name:
        raise ValueError("datasets() needs at least one shard dataset. Received: {}")
    names = list(by_name)
    spec = by_name[names[0]].element_spec
    for name in names[1:]:
        if by_name[name].element_spec != spec:
            raise ValueError(
                f"Shard datasets must share one element spec: {names[0]!r} has {spec}, "
                f"{name!r} has {by_name[name].element_spec}"
            )
    variants = tf.stack([tf.data.experimental.to_variant(by_name[n]) for n in names])
    index = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(names), tf.range(len(names), dtype=tf.int64)
        ),
        default_value=-1,
    )

    def read(name: tf.Tensor) -> tf.data.Dataset:
        i = index.lookup(name)
        with tf.control_dependencies([tf.debugging.Assert(i >= 0, ["Unknown shard:", name])]):
            i = tf.identity(i)
        return tf.data.experimental.from_variant(tf.gather(variants, i), spec)

    return read


def tfds_slices(
    names: Sequence[str], as_supervised: bool = True, data_dir: str | None = None
) -> Reader:
    """Reads `tfds:NAME:SPLIT[a%:b%]` shards (`shards.expand("tfds:NAME:SPLIT:N")`).

    Each slice is opened with `tfds.load` once, up front; reading stays in tf.data.
    """
    import tensorflow_datasets as tfds  # Heavy import, only for TFDS shards.

    by_name = {}
    for name in names:
        _, dataset, split = name.split(":", 2)
        by_name[name] = tfds.load(
            dataset, split=split, as_supervised=as_supervised, data_dir=data_dir
        )
    return datasets(by_name)
