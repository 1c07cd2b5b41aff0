"""Shard readers: what a dispatched shard's name reads to.

`tfscale.data.dispatched.DispatchedInput` reads each leased shard with a
reader, a shard's name (a `tf.string` tensor) -> a `tf.data.Dataset`, inside
tf.data: elements never pass through Python. Any function of that shape is a
reader; these cover the shard names `tfscale.data.dispatcher.shards` makes:

- `tfrecord(parse)`: TFRecord files, each record parsed by `parse` (any
  schema); a `ShardReader`, whose parse runs after the shards are merged;
- `records(image_shape)`: tfscale's image-classification record format;
- `ranges()`: `range:A:B` shards, the integers A..B-1 (tests, benchmarks);
- `datasets(by_name)`: shards whose datasets are built up front, e.g. TFDS
  split slices (`tfds_slices`).

`elements(name)` reads a shard into Python values instead, for
`tfscale.data.dispatcher.consumer.ShardConsumer`. TensorFlow is imported
on first use, so that reading `range:` shards (worker processes of tests
and benchmarks) starts without it.

Example (a user's own schema):

```python
features = {"text": tf.io.FixedLenFeature([], tf.string),
            "score": tf.io.FixedLenFeature([], tf.float32)}
reader = readers.tfrecord(lambda r: tf.io.parse_single_example(r, features))
data = dispatched.DispatchedInput("127.0.0.1:40123", "train", reader)
```
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Mapping
from typing import Optional
from typing import Sequence

from tfscale.data.dispatcher import shards as shards_lib

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "Reader",
    "ShardReader",
    "datasets",
    "elements",
    "ranges",
    "records",
    "tfds_slices",
    "tfrecord",
]

Reader = Callable[["tf.Tensor"], "tf.data.Dataset"]


class ShardReader:
    """A reader in two steps: `read` a shard's raw elements, then `parse` each.

    `DispatchedInput` parses after the shards' elements were merged into one
    stream, with one parallel map over all of them (as plain tf.data does
    after its interleave), instead of one map per shard. Calling it reads
    and parses one shard, so it is also a plain `Reader`.

    Args:
      read: shard name -> its raw elements.
      parse: raw element -> element; None keeps them raw.

    Example:

    ```python
    reader = ShardReader(tf.data.TFRecordDataset, parse=json_example)
    dataset = reader(tf.constant("/data/part-0.tfrecord"))
    ```
    """

    def __init__(
        self,
        read: Callable[[tf.Tensor], tf.data.Dataset],
        parse: Optional[Callable[..., Any]] = None,
    ):
        self.read = read
        self.parse = parse

    def __call__(self, name: tf.Tensor) -> tf.data.Dataset:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel,redefined-outer-name

        dataset = self.read(name)
        if self.parse is None:
            return dataset
        return dataset.map(self.parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def __repr__(self) -> str:
        return f"ShardReader(read={self.read!r}, parse={self.parse!r})"


def tfrecord(
    parse: Optional[Callable[[tf.Tensor], Any]] = None, buffer_size: Optional[int] = None
) -> ShardReader:
    """Reads a TFRecord file, parsing each record with `parse` (None: raw records).

    Args:
      parse: serialized record (a scalar `tf.string`) -> element.
      buffer_size: the file reader's read buffer, bytes (TFRecordDataset's default if None).
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel,redefined-outer-name

    return ShardReader(lambda name: tf.data.TFRecordDataset(name, buffer_size=buffer_size), parse)


def records(image_shape: Sequence[int]) -> ShardReader:
    """Reads tfscale's record format (`tfscale.data.records`): {"image", "label", "id"}.

    Args:
      image_shape: the shape of one image, e.g. `(28, 28, 1)` or `(32, 32, 3)`.

    Raises:
      ValueError: for a shape that is not positive ints.
    """
    from tfscale.data import records as records_lib  # pylint: disable=import-outside-toplevel

    return tfrecord(records_lib.parse_fn(_image_shape(image_shape)))


def ranges() -> Reader:
    """Reads `range:A:B` shards: the int64s A..B-1."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel,redefined-outer-name

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
    import tensorflow as tf  # pylint: disable=import-outside-toplevel,redefined-outer-name

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
    names: Sequence[str], as_supervised: bool = True, data_dir: Optional[str] = None
) -> Reader:
    """Reads `tfds:NAME:SPLIT[a%:b%]` shards (`shards.expand("tfds:NAME:SPLIT:N")`).

    Each slice is opened with `tfds.load` once, up front; reading stays in tf.data.
    """
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    by_name = {}
    for name in names:
        dataset, split = _tfds_slice(name)
        by_name[name] = tfds.load(
            dataset, split=split, as_supervised=as_supervised, data_dir=data_dir
        )
    return datasets(by_name)


def elements(name: str, image_shape: Optional[Sequence[int]] = None) -> Iterator[Any]:
    """The elements of one shard, as Python values.

    Args:
      name: a shard name: `range:A:B`, `tfds:NAME:SPLIT[a%:b%]` or the path
        of a TFRecord file in tfscale's record format.
      image_shape: the shape of one image of a record file, e.g. `(28, 28, 1)`.

    Returns:
      An iterator over ints for `range:` shards, `(image, label)` NumPy pairs
      for TFDS slices, and `{"image", "label", "id"}` dicts of NumPy values
      for record files.

    Raises:
      ValueError: for a record file without `image_shape`, or a bad shape.

    Example:

    ```python
    list(elements("range:0:3"))  # [0, 1, 2]
    consumer = ShardConsumer(client, "train", "w0", functools.partial(
        elements, image_shape=(32, 32, 3)))
    ```
    """
    if name.startswith("range:"):
        return iter(range(*shards_lib.range_bounds(name)))
    if name.startswith("tfds:"):
        return _tfds_elements(name)
    if image_shape is None:
        raise ValueError(
            f"Reading the record file {name!r} needs the shape of its images. "
            "Received: image_shape=None"
        )
    return _record_elements(name, _image_shape(image_shape))


def _tfds_slice(name: str) -> tuple[str, str]:
    """`(dataset, split)` of a `tfds:NAME:SPLIT[a%:b%]` shard name."""
    _, dataset, split = name.split(":", 2)
    return dataset, split


def _tfds_elements(name: str) -> Iterator[Any]:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    dataset, split = _tfds_slice(name)
    yield from tfds.as_numpy(tfds.load(dataset, split=split, as_supervised=True))


def _record_elements(path: str, image_shape: tuple[int, ...]) -> Iterator[Any]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel,redefined-outer-name

    from tfscale.data import records as records_lib  # pylint: disable=import-outside-toplevel

    parse = records_lib.parse_fn(image_shape)
    for serialized in tf.data.TFRecordDataset([path]):
        yield {key: value.numpy() for key, value in parse(serialized).items()}


def _image_shape(image_shape: Sequence[int]) -> tuple[int, ...]:
    """`image_shape` as a tuple of ints; ValueError unless they are positive (one or more)."""
    try:
        shape = tuple(operator.index(d) for d in image_shape)
    except TypeError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(
            "image_shape must be positive ints, e.g. (28, 28, 1). "
            f"Received: image_shape={image_shape!r}"
        )
    return shape
