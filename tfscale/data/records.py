"""The TFRecord format of image-classification shards: write and parse.

Each record is a `tf.train.Example` with `image` (raw uint8 bytes, HxW),
`label` (int64) and `id` (int64, unique in the split, so a reader can audit
which elements it saw).

Example:

```python
records.write_examples("/tmp/x.tfrecord", images, labels, ids)
ds = tf.data.TFRecordDataset(["/tmp/x.tfrecord"]).map(records.parse_fn((28, 28, 1)))
```
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

__all__ = [
    "count",
    "parse_fn",
    "write_examples",
]

Element = dict[str, tf.Tensor]

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "id": tf.io.FixedLenFeature([], tf.int64),
}


def write_examples(path: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    """Writes uint8 images with their labels and ids to one TFRecord file.

    Raises:
      ValueError: if the three arrays differ in length or images are not uint8.
    """
    if not len(images) == len(labels) == len(ids):
        raise ValueError(
            "images, labels and ids must have the same length. Received: "
            f"{len(images)}, {len(labels)}, {len(ids)}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8. Received: dtype={images.dtype}")
    with tf.io.TFRecordWriter(path) as writer:
        for image, label, element_id in zip(images, labels, ids):
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image": _bytes(image.tobytes()),
                        "label": _int(int(label)),
                        "id": _int(int(element_id)),
                    }
                )
            )
            writer.write(example.SerializeToString())


def count(path: str) -> int:
    """The number of records in one TFRecord file (reads it through)."""
    return int(tf.data.TFRecordDataset([path]).reduce(0, lambda n, _: n + 1))


def parse_fn(image_shape: tuple[int, int, int]) -> Callable[[tf.Tensor], Element]:
    """Returns a function from a serialized record to `{"image", "label", "id"}`.

    The image comes out as float32 in [0, 1] with shape `image_shape`.
    """

    def parse(serialized: tf.Tensor) -> Element:
        features = tf.io.parse_single_example(serialized, _FEATURES)
        image = tf.io.decode_raw(features["image"], tf.uint8)
        image = tf.cast(tf.reshape(image, image_shape), tf.float32) / 255.0
        return {"image": image, "label": features["label"], "id": features["id"]}

    return parse


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
