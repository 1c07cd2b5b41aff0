"""A `tf.distribute.Strategy` that lays Keras variables out on a DTensor mesh.

Keras's TensorFlow trainer already cooperates with a strategy: a model
built in a strategy's scope keeps it, `fit` builds the optimizer in its
scope, runs each step through `strategy.run`, and hands the input to
`strategy.experimental_distribute_dataset`. `DTensorStrategy` fills those
hooks with DTensor:

- every variable created in its scope is a `ShardedVariable` laid out by
  the `LayoutMap` (by its Keras path); optimizer state takes the layout of
  the variable it belongs to (Keras creates it inside
  `colocate_vars_with(variable)`); scalars (counters, metric totals) are
  replicated;
- `strategy.run` returns every output gathered (replicated), so logs,
  metrics and `predict` outputs read as ordinary arrays;
- input batches become DTensors split on the mesh's batch axis, and the
  iterator handed to Keras is a plain Python iterator, so Keras takes each
  batch outside its compiled step (its `get_next_as_optional` path has no
  DTensor layout propagation).

To Keras the strategy is one replica: DTensor computes on the global batch,
so gradients need no all-reduce and losses no rescaling.

Example:

```python
strategy = DTensorStrategy(build_mesh("batch=2,model=2"), LayoutMap.preset("megatron"))
with strategy.scope():
    model = make_model()
    model.compile(optimizer="adam", loss="mse")
model.fit(x, y, batch_size=64)
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Optional

import tensorflow as tf
from tensorflow.experimental import dtensor

from tfscale import compat
from tfscale.sharding import layout_map as layout_map_lib
from tfscale.sharding import mesh as mesh_lib
from tfscale.sharding import variables
from tfscale.strategies import keras_paths

__all__ = [
    "DTensorStrategy",
    "InputSplit",
    "layout_for",
]


def layout_for(
    path: str,
    shape: tuple[int, ...],
    layout_map: layout_map_lib.LayoutMap,
    mesh: dtensor.Mesh,
) -> dtensor.Layout:
    """The layout of the variable at `path`: its rule's, or replicated.

    Raises:
      ValueError: for a rule of the wrong rank, an axis the mesh lacks, an
        axis used twice, or a dimension the axis size does not divide.
    """
    axes = layout_map.axes_for(path, shape) if shape else None
    if axes is None:
        return dtensor.Layout.replicated(mesh, len(shape))
    used = [a for a in axes if a is not None]
    for dim, axis in enumerate(axes):
        if axis is None:
            continue
        if axis not in mesh.dim_names:
            raise ValueError(
                f"Variable {path!r} of shape {shape} is laid out {axes}, but the mesh has no "
                f"axis {axis!r}. Mesh axes: {', '.join(mesh.dim_names)}"
            )
        if used.count(axis) > 1:
            raise ValueError(
                f"Variable {path!r} is laid out {axes}: mesh axis {axis!r} can split one "
                "dimension only."
            )
        size = mesh.dim_size(axis)
        if shape[dim] % size:
            raise ValueError(
                f"Variable {path!r} of shape {shape}: dimension {dim} ({shape[dim]}) is not "
                f"divisible by mesh axis {axis!r} (size {size})."
            )
    return dtensor.Layout([a or dtensor.UNSHARDED for a in axes], mesh)


class _DTensorExtended(compat.default_extended_class()):
    """The strategy's implementation: variable creation, steps and input."""

    def __init__(
        self,
        container_strategy: "DTensorStrategy",
        mesh: dtensor.Mesh,
        layout_map: layout_map_lib.LayoutMap,
        batch_axis: Optional[str],
    ):
        super().__init__(container_strategy)
        self.mesh = mesh
        self.layout_map = layout_map
        self.batch_axis = batch_axis
        # The layout optimizer state copies, set by `colocate_vars_with`.
        self._reference = threading.local()

    def _scope(self, strategy: tf.distribute.Strategy) -> Any:
        # The default strategy's scope only checks; this one installs the
        # variable creator below.
        return compat.strategy_extended_scope(self, strategy)

    def variable_created_in_scope(self, v: tf.Variable) -> bool:
        return isinstance(v, dtensor.DVariable) and v.layout.mesh == self.mesh

    @contextlib.contextmanager
    def colocate_vars_with(self, colocate_with_variable: Any) -> Iterator[None]:
        layout = getattr(colocate_with_variable, "layout", None)
        previous = getattr(self._reference, "layout", None)
        self._reference.layout = layout if isinstance(layout, dtensor.Layout) else None
        try:
            yield
        finally:
            self._reference.layout = previous

    def _create_variable(
        self, next_creator: Callable[..., tf.Variable], **kwargs: Any
    ) -> tf.Variable:
        del next_creator  # DTensor variables are made here, not by TF's default creator.
        initial_value = kwargs["initial_value"]
        name = kwargs.get("name")
        # Optimizer state is created inside the first traced step; its
        # initial value must be made eagerly.
        with tf.init_scope():
            value = initial_value() if callable(initial_value) else initial_value
            value = tf.convert_to_tensor(value, dtype=kwargs.get("dtype"))
            shape = tuple(int(d) for d in value.shape)
            layout = getattr(self._reference, "layout", None)
            if layout is None or layout.rank != len(shape):
                parent = compat.keras_name_scope_path()
                path = f"{parent}/{name}" if parent else str(name)
                layout = layout_for(path, shape, self.layout_map, self.mesh)
            return variables.ShardedVariable(
                variables.to_layout(value, layout),
                name=name,
                trainable=kwargs.get("trainable", True),
                aggregation=kwargs.get("aggregation", tf.VariableAggregation.NONE),
                synchronization=kwargs.get("synchronization", tf.VariableSynchronization.AUTO),
            )

    def _call_for_each_replica(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        outputs = super()._call_for_each_replica(fn, args, kwargs)
        return tf.nest.map_structure(self._gathered, outputs)

    def _gathered(self, value: Any) -> Any:
        if isinstance(value, tf.Tensor):
            return variables.gather(value, self.mesh)
        return value

    def _experimental_distribute_dataset(
        self, dataset: tf.data.Dataset, options: Any
    ) -> "BatchedDTensorDataset":
        return BatchedDTensorDataset(dataset, self.mesh, self.batch_axis)

    def _distribute_datasets_from_function(self, dataset_fn: Any, options: Any) -> Any:
        raise NotImplementedError(
            "A dtensor distribution takes a tf.data.Dataset (dist.distribute_dataset(dataset, "
            "global_batch_size)), not a dataset function."
        )


class DTensorStrategy(tf.distribute.Strategy):
    """Runs Keras models with variables laid out on a DTensor mesh.

    Args:
      mesh: the `dtensor.Mesh` (see `tfscale.sharding.build_mesh`).
      layout_map: how variables are split; unmatched ones are replicated.
      batch_axis: the mesh axis input batches are split over; default
        `"batch"` when the mesh has it, else none (every device then sees the
        whole batch). A name the mesh lacks is an error.
    """

    def __init__(
        self,
        mesh: dtensor.Mesh,
        layout_map: layout_map_lib.LayoutMap,
        batch_axis: Optional[str] = None,
    ):
        batch_axis = mesh_lib.batch_axis_of(mesh.dim_names, batch_axis)
        super().__init__(_DTensorExtended(self, mesh, layout_map, batch_axis))

    @property
    def mesh(self) -> dtensor.Mesh:
        return self.extended.mesh

    @property
    def layout_map(self) -> layout_map_lib.LayoutMap:
        return self.extended.layout_map

    @property
    def batch_axis(self) -> Optional[str]:
        return self.extended.batch_axis

    def batch_layout(self, rank: int) -> dtensor.Layout:
        """The layout of an input tensor of this rank: split on the batch axis."""
        if self.batch_axis is None or rank == 0:
            return dtensor.Layout.replicated(self.mesh, rank)
        return dtensor.Layout.batch_sharded(self.mesh, self.batch_axis, rank)


class _IterableDTensorDataset(compat.DistributedDatasetBase):
    """Base of the datasets handed to Keras: iterating gives DTensor batches.

    Keras accepts `tf.distribute.DistributedDataset`s as they are; the
    iterator is a plain Python one, so Keras's train function takes each
    batch outside its compiled step. It ends with `OutOfRangeError`, which
    Keras reads as the end of an epoch.
    """

    def __init__(self, element_spec: Any, cardinality: int):
        # The upstream base's own state is not used (see compat.DistributedDatasetBase).
        self._tfscale_element_spec = element_spec
        self._tfscale_cardinality = cardinality

    @property
    def element_spec(self) -> Any:
        return self._tfscale_element_spec

    @property
    def cardinality(self) -> int:
        return self._tfscale_cardinality

    def _batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        batches = self._batches()

        def iterate() -> Iterator[Any]:
            yield from batches
            raise tf.errors.OutOfRangeError(None, None, "End of sequence")

        return iterate()


class BatchedDTensorDataset(_IterableDTensorDataset):
    """A batched dataset whose batches are laid out on the mesh one by one.

    What `model.fit(x, y, batch_size=...)` gets: a batch the batch axis
    divides is split over it; another (a final partial batch) is
    replicated, which computes the same result.
    """

    def __init__(self, dataset: tf.data.Dataset, mesh: dtensor.Mesh, batch_axis: Optional[str]):
        super().__init__(dataset.element_spec, int(dataset.cardinality()))
        self._dataset = dataset
        self._mesh = mesh
        self._batch_axis = batch_axis

    def _layout(self, value: tf.Tensor) -> dtensor.Layout:
        rank = value.shape.rank
        split = self._mesh.dim_size(self._batch_axis) if self._batch_axis else 1
        if rank and split > 1 and value.shape[0] % split == 0:
            return dtensor.Layout.batch_sharded(self._mesh, self._batch_axis, rank)
        return dtensor.Layout.replicated(self._mesh, rank)

    def __iter__(self) -> Iterator[Any]:
        peeked = keras_paths.peeked_batch(self._dataset.element_spec)
        if peeked is not None:  # Keras's model build with a generator (see keras_paths)
            return self._laid_out(peeked)
        return super().__iter__()

    def _batches(self) -> Iterator[Any]:
        return self._laid_out(self._dataset)

    def _laid_out(self, dataset: tf.data.Dataset) -> Iterator[Any]:
        for batch in dataset:
            yield tf.nest.map_structure(lambda t: variables.to_layout(t, self._layout(t)), batch)


@dataclasses.dataclass(frozen=True)
class InputSplit:
    """Which part of each global batch a client reads, and how its devices split it.

    The clients whose devices sit at the same positions of the batch axis
    form a group and must read the same data (the mesh splits a replica
    over them); each group reads `1 / num_groups` of every global batch.

    Attributes:
      num_groups: groups of clients reading different data.
      group: this client's group.
      parts: how many slices this client cuts its batch into (the distinct
        batch-axis positions of its devices).
      device_parts: for each local device, in mesh order, its slice.
    """

    num_groups: int
    group: int
    parts: int
    device_parts: tuple[int, ...]

    @classmethod
    def of(cls, mesh: dtensor.Mesh, batch_axis: Optional[str]) -> "InputSplit":
        """The split for this client of `mesh` (clients own equal, contiguous device ranges)."""
        local = mesh.num_local_devices()
        axis = mesh.dim_names.index(batch_axis) if batch_axis else None

        def positions(client: int) -> tuple[int, ...]:
            ids = range(client * local, (client + 1) * local)
            return tuple(0 if axis is None else mesh.device_location(i)[axis] for i in ids)

        clients = mesh.size // local
        groups = sorted({tuple(sorted(set(positions(c)))) for c in range(clients)})
        mine = positions(mesh.local_device_ids()[0] // local)
        ordered = sorted(set(mine))
        return cls(
            num_groups=len(groups),
            group=groups.index(tuple(ordered)),
            parts=len(ordered),
            device_parts=tuple(ordered.index(p) for p in mine),
        )


class DTensorBatches(_IterableDTensorDataset):
    """An unbatched dataset batched to the global batch and laid out on the batch axis.

    One tf.data pipeline per client batches its share of the global batch
    and cuts it into one slice per batch-axis position of its devices;
    Python only packs each batch's slices onto the devices. So a global
    batch holds exactly the elements a one-device run's batch holds, in
    the same order on a single client, whatever the source (files are
    not split among replicas, as `tf.data`'s auto-sharding would).

    `dataset` must already be this client's part (`InputSplit.group` of
    `InputSplit.num_groups`).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        strategy: DTensorStrategy,
        global_batch_size: int,
        batch_fn: Optional[Callable[..., Any]] = None,
    ):
        split = InputSplit.of(strategy.mesh, strategy.batch_axis)
        per_group = global_batch_size // split.num_groups
        self._args = (dataset, strategy, global_batch_size)
        self._batch_fn = batch_fn
        batched = dataset.batch(per_group, drop_remainder=True)
        if batch_fn is not None:
            batched = batched.map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE)
        element_spec = tf.nest.map_structure(
            lambda spec: tf.TensorSpec([global_batch_size, *spec.shape[1:]], spec.dtype),
            batched.element_spec,
        )
        count = int(dataset.cardinality())
        super().__init__(element_spec, count // per_group if count >= 0 else count)
        self._layouts = tf.nest.map_structure(
            lambda spec: strategy.batch_layout(spec.shape.rank), batched.element_spec
        )
        self._device_parts = split.device_parts
        parts = split.parts
        is_tuple = isinstance(batched.element_spec, tuple)

        def cut(*batch: tf.Tensor) -> Any:
            batch = batch if is_tuple else batch[0]
            return tf.nest.map_structure(lambda t: tuple(tf.split(t, parts)), batch)

        # No autotuning thread: deleting an iterator can wait out its sleep
        # (see compat.disable_device_pipeline_autotune).
        options = tf.data.Options()
        options.autotune.enabled = False
        self._sliced = (
            batched.map(cut, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
            .with_options(options)
        )

    def map(self, map_func: Callable[..., Any]) -> "DTensorBatches":
        """These batches with `map_func` applied to each (this client's part of a) batch.

        Keras maps `fit(class_weight=...)` over its input this way; the
        weights are per example, so mapping a part of the batch is the same.
        """
        first = self._batch_fn
        if first is None:
            composed = map_func
        else:

            def composed(*batch: Any) -> Any:
                out = first(*batch)
                return map_func(*out) if isinstance(out, tuple) else map_func(out)

        return DTensorBatches(*self._args, batch_fn=composed)

    def prefetch(self, buffer_size: Any = None, name: Optional[str] = None) -> "DTensorBatches":
        """These batches: the pipeline prefetches already."""
        del buffer_size, name
        return self

    def _batches(self) -> Iterator[Any]:
        layouts = tf.nest.flatten(self._layouts)
        for batch in self._sliced:
            slices = tf.nest.flatten(batch)  # each tensor's slices, one tensor after another
            step = len(slices) // len(layouts)
            packed = [
                dtensor.pack([slices[i * step + p] for p in self._device_parts], layout)
                for i, layout in enumerate(layouts)
            ]
            yield tf.nest.pack_sequence_as(self._layouts, packed)
