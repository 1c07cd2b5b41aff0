"""Sharded variables that read and write like ordinary ones.

A `ShardedVariable` is a `dtensor.DVariable` whose host-side reads
(`numpy()`, `np.asarray`, so Keras's `get_weights` and `save_weights`) gather
the full value, and whose host-side writes (`assign` of an array, so
`set_weights` and `load_weights`) split the value to the variable's layout.
Because checkpoints hold full values, a checkpoint written on one mesh
restores into a mesh of any other shape.

Example:

```python
value = to_layout(tf.ones((8, 16)), dtensor.Layout([dtensor.UNSHARDED, "model"], mesh))
v = ShardedVariable(value, name="kernel")
v.numpy().shape   # (8, 16): gathered
v.assign(np.zeros((8, 16), "float32"))   # split to the layout again
```
"""

from __future__ import annotations

import weakref
from typing import Any
from typing import Optional

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from tfscale import compat

__all__ = [
    "ShardedVariable",
    "gather",
    "is_dtensor",
    "to_layout",
]


def is_dtensor(value: Any) -> bool:
    """Whether `value` is an eager tensor or variable placed on a DTensor mesh."""
    if isinstance(value, dtensor.DVariable):
        return True
    return isinstance(value, tf.Tensor) and tf.executing_eagerly() and dtensor.is_dtensor(value)


def to_layout(value: Any, layout: dtensor.Layout) -> tf.Tensor:
    """`value` (a host array or tensor, or a DTensor) laid out as `layout`."""
    if not is_dtensor(value):
        value = tf.convert_to_tensor(value)
        value = dtensor.copy_to_mesh(
            value, dtensor.Layout.replicated(layout.mesh, value.shape.rank)
        )
    return dtensor.relayout(value, layout)


def gather(value: Any, mesh: Optional[dtensor.Mesh] = None) -> tf.Tensor:
    """The full value of a DTensor (replicated on its mesh); other values pass through.

    Inside a `tf.function`, where layouts cannot be read, every tensor is a
    DTensor and `mesh` must be given.
    """
    if not tf.executing_eagerly():
        if mesh is None:
            raise ValueError("gather inside a tf.function needs the mesh. Received: mesh=None")
        return dtensor.relayout(value, dtensor.Layout.replicated(mesh, value.shape.rank))
    if not is_dtensor(value):
        return value
    layout = dtensor.fetch_layout(value)
    if layout.is_fully_replicated():
        return value
    return dtensor.relayout(value, dtensor.Layout.replicated(layout.mesh, layout.rank))


class ShardedVariable(compat.ReadOverride, dtensor.DVariable):
    """A DVariable that reads as a full array on the host and assigns from one.

    Args:
      initial_value: a DTensor whose layout the variable keeps.
      **kwargs: `tf.Variable` arguments (`name`, `trainable`, ...).
    """

    def __init__(self, initial_value: tf.Tensor, **kwargs: Any):
        super().__init__(initial_value, **kwargs)
        # graph -> the value this variable was last given in it (weakly: the
        # graph owns the tensor, and a strong reference would keep it alive).
        self._written: "weakref.WeakKeyDictionary[tf.Graph, weakref.ref]" = (
            weakref.WeakKeyDictionary()
        )

    # In a traced step, DTensor's expansion of a function can let a read of a
    # variable run before an earlier write to it, dropping the order that
    # automatic control dependencies give (Keras's Adam then applies a stale
    # momentum, or divides by a stale velocity). So writes compute the new
    # value as a tensor, and later reads in the same graph use that tensor:
    # a data dependency, which no expansion can reorder.

    def read_override(self) -> Optional[tf.Tensor]:
        """The value this variable was last given in the graph being traced, if any."""
        if tf.executing_eagerly():
            return None
        ref = self._written.get(tf.compat.v1.get_default_graph())
        return None if ref is None else ref()

    def _write(self, value: Any, read_value: bool, name: Optional[str]) -> Any:
        value = tf.convert_to_tensor(value, dtype=self.dtype)
        written = super().assign(value, name=name, read_value=False)
        # Keyed by the graph being traced (a write inside a cond branch stays
        # in the branch's graph, even for a value captured from outside).
        self._written[tf.compat.v1.get_default_graph()] = weakref.ref(value)
        return value if read_value else written

    def assign_add(
        self,
        delta: Any,
        use_locking: Optional[bool] = None,
        name: Optional[str] = None,
        read_value: bool = True,
    ) -> Any:
        if tf.executing_eagerly():
            return super().assign_add(delta, use_locking, name, read_value)
        return self._write(self.value() + delta, read_value, name)

    def assign_sub(
        self,
        delta: Any,
        use_locking: Optional[bool] = None,
        name: Optional[str] = None,
        read_value: bool = True,
    ) -> Any:
        if tf.executing_eagerly():
            return super().assign_sub(delta, use_locking, name, read_value)
        return self._write(self.value() - delta, read_value, name)

    def numpy(self) -> np.ndarray:
        # A replicated DTensor's first component is the full value; reading
        # components works in multi-client meshes too, where only this
        # client's devices are addressable.
        return dtensor.unpack(gather(self.read_value()))[0].numpy()

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        del copy  # numpy() always returns a fresh array.
        return np.asarray(self.numpy(), dtype=dtype)

    def assign(
        self,
        value: Any,
        use_locking: Optional[bool] = None,
        name: Optional[str] = None,
        read_value: bool = True,
    ) -> Any:
        if not tf.executing_eagerly():
            return self._write(value, read_value, name)
        if not is_dtensor(value):
            value = to_layout(tf.cast(value, self.dtype), self.layout)
        return super().assign(value, use_locking=use_locking, name=name, read_value=read_value)

    def __repr__(self) -> str:
        return (
            f"<ShardedVariable {self.name!r} shape={tuple(self.shape)} dtype={self.dtype.name} "
            f"layout={list(self.layout.sharding_specs)}>"
        )
