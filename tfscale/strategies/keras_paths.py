"""What tfscale's tf.distribute strategies change so Keras 3's everyday paths work.

Stock strategies (TF 2.21 / Keras 3.15) break four Keras features, each
reproduced with no tfscale involved:

1. `compile(steps_per_execution=N)`, N > 1, fails with 2+ replicas: a
   collective's call-time key is lost inside Keras's `tf.cond`
   (keras-team/keras#19246). Fix: keys taken when the step is traced
   (`compat.trace_time_collective_keys`).
2. A Python generator given to `fit` or `evaluate` loses batches: Keras
   iterates the input once more to build the model, and that iterator's
   prefetch drains the generator. Fix: the distributed datasets made here
   (and the dtensor kind's) hand that build the batch Keras already peeked
   (`compat.keras_generator_peek`), so the generator is read once; a
   `tf.data` input gets a batch of zeros of its shapes, so an input that
   cannot be rewound (shards leased from the dispatcher) loses nothing
   either.
3. `fit(dist.distribute_dataset(...), class_weight=...)` raises
   "'DistributedDataset' object has no attribute 'map'": Keras maps the
   weights over its input. Fix: these datasets `map` their source (before
   it is split over replicas; weighting is per example, so the same).
4. Unsynchronized BatchNormalization keeps a moving mean and variance per
   replica (created with `aggregation=NONE`): the saved weights are replica
   0's while `evaluate` uses each replica's own. Fix: inside this scope the
   moving statistics are averaged over replicas on each write, so every
   replica holds the same value.

Also, with no Keras involved: an input whose batches are the caller's own
numpy memory (a `keras.utils.PyDataset` or a generator that returns views
of a larger array, through `from_generator`) gets that memory overwritten
under a multi-replica strategy when the array happens to start on a 64-byte
boundary: TensorFlow adopts such an array without copying, the split over
replicas gives replica 0 a slice of it, and a kernel of the step writes its
result in place. The caller's labels change, so the next epoch trains on
corrupted data. Fix: the datasets distributed here copy every numeric
tensor of a batch into memory TensorFlow owns before the split (one memcpy
per batch).

Each fix lives in the strategy subclass (`KerasPathsMixin`) and the datasets
it returns; code that uses stock strategies is not affected.

Example:

```python
class MyMirrored(KerasPathsMixin, tf.distribute.MirroredStrategy):
    pass

strategy = MyMirrored(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = make_model()
    model.compile("sgd", "mse", steps_per_execution=8)
model.fit(python_generator(), steps_per_epoch=10)
```
"""

from __future__ import annotations

import contextlib
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Optional
from typing import Union

import numpy as np
import tensorflow as tf

from tfscale import compat

__all__ = [
    "KerasDistributedDataset",
    "KerasPathsMixin",
    "MOVING_STATISTICS",
    "replica_state_in_sync",
    "peeked_batch",
]

# Variable names of the running statistics of Keras's normalization layers.
MOVING_STATISTICS = ("moving_mean", "moving_variance")

Source = Union[tf.data.Dataset, Callable[[tf.distribute.InputContext], tf.data.Dataset]]


def replica_state_in_sync(next_creator: Callable[..., tf.Variable], **kwargs: Any) -> tf.Variable:
    """A variable creator: moving statistics are averaged over replicas on write.

    Applies to the non-trainable floating-point variables that normalization
    layers keep as running averages (`moving_mean`, `moving_variance`: Keras
    creates them with no aggregation, so each replica kept its own). Other
    state is left as it is: a variable written inside a `tf.cond` in the
    replica step (e.g. `LossScaleOptimizer`'s dynamic scale) cannot take an
    aggregation, which needs a cross-replica call there.
    """
    name = str(kwargs.get("name") or "").rsplit("/", 1)[-1].split(":")[0]
    dtype = kwargs.get("dtype")
    if (
        name in MOVING_STATISTICS
        and kwargs.get("trainable") is False
        and kwargs.get("aggregation") in (None, tf.VariableAggregation.NONE)
        and kwargs.get("synchronization")
        in (None, tf.VariableSynchronization.AUTO, tf.VariableSynchronization.ON_WRITE)
        and dtype is not None
        and tf.as_dtype(dtype).is_floating
    ):
        kwargs["aggregation"] = tf.VariableAggregation.MEAN
    return next_creator(**kwargs)


# Tensors of these dtypes are never adopted from numpy memory.
_NOT_COPIED = (tf.string, tf.variant, tf.resource)


def _owned_memory(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with each batch's numeric tensors copied into TensorFlow's own memory.

    See the module docstring: a tensor adopted from a caller's numpy array
    must not reach the replicas' kernels, which may write into it.
    """

    def copy(tensor: Any) -> Any:
        if isinstance(tensor, tf.Tensor) and tensor.dtype not in _NOT_COPIED:
            return tf.raw_ops.DeepCopy(x=tensor)
        return tensor

    def copy_element(*element: Any) -> Any:
        copied = tf.nest.map_structure(copy, element)
        return copied if isinstance(dataset.element_spec, tuple) else copied[0]

    return dataset.map(copy_element, deterministic=True)


def peeked_batch(element_spec: Any) -> Optional[tf.data.Dataset]:
    """Inside Keras's model build: a dataset of one batch for it, typed as
    `element_spec`; else None (see the module doc).

    With a generator input, the batch Keras already peeked (its arrays
    copied: they may be views of the caller's memory); with a `tf.data`
    input of fully defined shapes, a batch of zeros (the build reads only
    shapes and dtypes, and an input that cannot be rewound, such as shards
    leased from a dispatcher, must not lose a batch to it); otherwise None.
    """
    peeked = compat.keras_generator_peek()
    if peeked is None:
        specs = tf.nest.flatten(element_spec)
        fully_defined = all(
            isinstance(s, tf.TensorSpec) and s.shape.is_fully_defined() for s in specs
        )
        if not (fully_defined and compat.in_keras_model_build()):
            return None
        zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), element_spec)
        return tf.data.Dataset.from_tensors(zeros)
    tensors = tf.nest.map_structure(
        lambda spec, value: tf.convert_to_tensor(np.array(value, copy=True), dtype=spec.dtype),
        element_spec,
        peeked,
        check_types=False,
    )
    return tf.data.Dataset.from_tensors(tensors)


class KerasDistributedDataset(compat.DistributedDatasetBase):
    """A strategy's distributed dataset that Keras's `fit` can weight and peek at.

    Iterating gives the strategy's own `tf.distribute.DistributedIterator`
    (so Keras's compiled multi-step loop takes it as is), except inside
    Keras's model build with a generator input (see the module docstring).

    Args:
      source: the batched `tf.data.Dataset`, or a function of a
        `tf.distribute.InputContext` returning this input pipeline's one.
      distribute: the strategy's stock distribution of such a source.
    """

    def __init__(
        self, source: Source, distribute: Callable[[Source], tf.distribute.DistributedDataset]
    ):
        # The upstream base's own state is not used (see compat.DistributedDatasetBase).
        self._source = source
        self._distribute = distribute
        self._distributed = distribute(source)

    @property
    def element_spec(self) -> Any:
        return self._distributed.element_spec

    @property
    def cardinality(self) -> Any:
        return self._distributed.cardinality

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self._source, tf.data.Dataset):
            peeked = peeked_batch(self._source.element_spec)
            if peeked is not None:  # Keras's model build: one batch, not from the input
                return iter(self._distribute(peeked.with_options(self._source.options())))
        return iter(self._distributed)

    def map(
        self, map_func: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> "KerasDistributedDataset":
        """This dataset with `map_func` applied to each (global, or per-pipeline) batch."""
        if isinstance(self._source, tf.data.Dataset):
            mapped: Source = self._source.map(map_func, *args, **kwargs)
        else:
            source = self._source

            def mapped(context: tf.distribute.InputContext) -> tf.data.Dataset:
                return source(context).map(map_func, *args, **kwargs)

        return KerasDistributedDataset(mapped, self._distribute)

    def prefetch(
        self, buffer_size: Any = None, name: Optional[str] = None
    ) -> "KerasDistributedDataset":
        """This dataset: its iterators prefetch to every device already."""
        del buffer_size, name
        return self


class KerasPathsMixin:
    """Mixed into a `tf.distribute.Strategy` subclass (first): the fixes of this module.

    Call `_keras_paths_init()` at the end of the subclass's `__init__`.
    """

    def _keras_paths_init(self) -> None:
        compat.trace_time_collective_keys(self)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def scope(self) -> Iterator[Any]:  # type: ignore[override]
        stock_scope = super().scope()  # type: ignore[misc]
        with stock_scope as strategy, tf.variable_creator_scope(replica_state_in_sync):
            yield strategy

    def experimental_distribute_dataset(
        self, dataset: tf.data.Dataset, options: Optional[tf.distribute.InputOptions] = None
    ) -> KerasDistributedDataset:
        stock = super().experimental_distribute_dataset  # type: ignore[misc]
        return KerasDistributedDataset(
            dataset, lambda source: stock(_owned_memory(source), options)
        )

    def distribute_datasets_from_function(
        self,
        dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset],
        options: Optional[tf.distribute.InputOptions] = None,
    ) -> KerasDistributedDataset:
        stock = super().distribute_datasets_from_function  # type: ignore[misc]

        def distribute(source: Source) -> tf.distribute.DistributedDataset:
            return stock(lambda context: _owned_memory(source(context)), options)

        return KerasDistributedDataset(dataset_fn, distribute)
