"""What a model holds, read once from a copy built on the host.

The planner predicts memory without running a model distributed: it builds
the model once, with no strategy, and records each variable's path, shape
and dtype, each layer's output per example, and (per optimizer) each
optimizer variable with the model variable it was made from. Layouts are
then applied to these shapes, candidate by candidate, by arithmetic.

Example:

```python
profile = model_profile(make_model)            # built once, cached by make_model
[v.path for v in profile.variables]            # ["mlp_up/kernel", ...]
state = optimizer_profile(make_model, "adam")  # iteration, learning_rate, 2 slots each
```
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Callable
from typing import Optional
from typing import Union

import keras
import numpy as np
import tensorflow as tf

from tfscale.planner import flops as flops_lib

__all__ = [
    "ActivationInfo",
    "ModelProfile",
    "OptimizerLike",
    "VariableInfo",
    "clear_cache",
    "host_model",
    "model_profile",
    "optimizer_profile",
]

ModelFn = Callable[[], keras.Model]
# An optimizer name ("adam"), its `keras.optimizers.serialize` dict, or an instance.
OptimizerLike = Union[str, dict, keras.optimizers.Optimizer, None]

# The weights whose last dimension is a layer's output features.
_OUTPUT_WEIGHTS = ("kernel", "embeddings")


@dataclasses.dataclass(frozen=True)
class VariableInfo:
    """One variable of a model or an optimizer.

    Attributes:
      path: the Keras variable path, which layout rules match.
      shape: the full shape.
      itemsize: bytes per element.
      trainable: whether it gets a gradient (model variables).
      owner: for optimizer state made from a model variable, that variable's
        path: the state takes its layout; else `None`.
    """

    path: str
    shape: tuple[int, ...]
    itemsize: int
    trainable: bool = False
    owner: Optional[str] = None

    @property
    def num_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize


@dataclasses.dataclass(frozen=True)
class ActivationInfo:
    """One layer output kept for the backward pass.

    Attributes:
      name: the layer (or `"input:<name>"` for a model input).
      elements: elements per example (dimensions after the batch's; an
        unknown dimension counts as 1).
      itemsize: bytes per element, from the layer's dtype policy.
      split_by: the path and shape of the weight whose last dimension is
        the output's last (the layer's last kernel or embedding table): a
        layout that splits that dimension splits the output the same way.
    """

    name: str
    elements: int
    itemsize: int
    split_by: Optional[tuple[str, tuple[int, ...]]] = None


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """Variables and layer outputs of a model built on the host.

    Attributes:
      name: the model's name.
      variables: `model.weights`, in order.
      activations: the inputs, then each layer's output, nested models
        expanded into their layers.
      layer_graph: whether the model has a layer graph (functional or
        Sequential) to read outputs from; a subclassed model's activations
        are only its inputs.
      layers: each layer's forward work per example (`flops.layer_costs`);
        empty without a layer graph.
      forward_ops: ops of a training-mode forward pass (`flops.forward_ops`);
        0 without a layer graph.
    """

    name: str
    variables: tuple[VariableInfo, ...]
    activations: tuple[ActivationInfo, ...]
    layer_graph: bool
    layers: tuple[flops_lib.LayerCost, ...] = ()
    forward_ops: int = 0


@dataclasses.dataclass
class _Entry:
    model: keras.Model
    profile: ModelProfile
    optimizers: dict[str, tuple[VariableInfo, ...]]


_CACHE: dict[ModelFn, _Entry] = {}


def model_profile(model_fn: ModelFn) -> ModelProfile:
    """The profile of `model_fn()`, built on the host on the first call per `model_fn`.

    Raises:
      ValueError: when called inside a distribution scope (the copy must be
        an ordinary one), or when `model_fn` returns an unbuilt model.
    """
    return _entry(model_fn).profile


def host_model(model_fn: ModelFn) -> keras.Model:
    """The host copy `model_profile` reads (built on the first call per `model_fn`).

    For reading only: training or changing it would change the profile.
    """
    return _entry(model_fn).model


def optimizer_profile(model_fn: ModelFn, optimizer: OptimizerLike) -> tuple[VariableInfo, ...]:
    """The variables `optimizer` holds when training `model_fn()`'s model.

    A fresh copy of the optimizer is built on the host copy of the model,
    so counters, learning rates and every slot (momentum, velocity, EMA,
    accumulated gradients...) are the ones Keras creates.

    Args:
      model_fn: builds the model.
      optimizer: a name, a serialized config, an instance (not changed), or
        `None` for the optimizer `model_fn` compiled the model with (no
        state if it did not).

    Returns:
      The optimizer's variables, each with the model variable it was made
      from.
    """
    entry = _entry(model_fn)
    if optimizer is None:
        optimizer = getattr(entry.model, "optimizer", None)
    fresh = _fresh_optimizer(optimizer)
    if fresh is None:
        return ()
    # Keras numbers each new optimizer's name (adam, adam_1, ...): not part of the key.
    config = {k: v for k, v in fresh.get_config().items() if k != "name"}
    key = repr((type(fresh).__name__, sorted(config.items())))
    if key not in entry.optimizers:
        entry.optimizers[key] = _built_state(fresh, entry.model)
    return entry.optimizers[key]


def clear_cache() -> None:
    """Forgets every host copy (they hold the full model's variables)."""
    _CACHE.clear()


def _entry(model_fn: ModelFn) -> _Entry:
    if model_fn not in _CACHE:
        if tf.distribute.has_strategy():
            raise ValueError(
                "The planner builds its copy of the model with no distribution: call it "
                f"outside a distribution scope. Received: scope of {tf.distribute.get_strategy()}"
            )
        with tf.device("/cpu:0"):
            model = model_fn()
        if not model.built:
            raise ValueError(
                "model_fn must return a built model (give it an input shape). "
                f"Received: unbuilt {type(model).__name__} {model.name!r}"
            )
        _CACHE[model_fn] = _Entry(model, _profile(model), {})
    return _CACHE[model_fn]


def _profile(model: keras.Model) -> ModelProfile:
    variables = tuple(
        VariableInfo(v.path, _shape(v.shape), _itemsize(v.dtype), bool(v.trainable))
        for v in model.weights
    )
    graph = _has_graph(model)
    activations = _activations(model) if graph else _inputs(model)
    layers = flops_lib.layer_costs(model) if graph else ()
    ops = flops_lib.forward_ops(model) if graph else 0
    return ModelProfile(model.name, variables, tuple(activations), graph, layers, ops)


def _has_graph(model: keras.Model) -> bool:
    try:
        return bool(model.inputs) and all(_has_output(layer) for layer in model.layers)
    except (AttributeError, ValueError):
        return False


def _has_output(layer: keras.layers.Layer) -> bool:
    try:
        layer.output
    except (AttributeError, ValueError):
        return False
    return True


def _inputs(model: keras.Model) -> list[ActivationInfo]:
    return [
        ActivationInfo(f"input:{t.name}", _elements(t.shape), _itemsize(t.dtype))
        for t in keras.tree.flatten(getattr(model, "inputs", None) or [])
    ]


def _activations(model: keras.Model) -> list[ActivationInfo]:
    found = _inputs(model)
    for layer in model.layers:
        if not isinstance(layer, keras.layers.InputLayer):  # counted as an input
            found += _layer_outputs(layer)
    return found


def _layer_outputs(layer: keras.layers.Layer) -> list[ActivationInfo]:
    if isinstance(layer, keras.Model) and _has_graph(layer):
        # A nested model's inputs are its callers' outputs, counted already.
        return [a for a in _activations(layer) if not a.name.startswith("input:")]
    split_by = None
    for weight in layer.weights:
        if weight.path.rsplit("/", 1)[-1] in _OUTPUT_WEIGHTS:
            split_by = (weight.path, _shape(weight.shape))
    # A layer called several times is counted at its first call only.
    return [
        ActivationInfo(layer.name, _elements(t.shape), _itemsize(t.dtype), split_by)
        for t in keras.tree.flatten(layer.output)
    ]


def _fresh_optimizer(optimizer: OptimizerLike) -> Optional[keras.optimizers.Optimizer]:
    if optimizer is None:
        return None
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return type(optimizer).from_config(optimizer.get_config())
    return keras.optimizers.get(optimizer)


def _built_state(optimizer: keras.optimizers.Optimizer, model: keras.Model) -> tuple:
    owners: dict[int, str] = {}
    make = optimizer.add_variable_from_reference

    def recording(reference_variable: Any, *args: Any, **kwargs: Any) -> Any:
        # What the DTensor strategy reads from `colocate_vars_with`: the
        # model variable whose layout the new state takes.
        variable = make(reference_variable, *args, **kwargs)
        owners[id(variable)] = reference_variable.path
        return variable

    # On this copy of the optimizer only; Keras's own methods are not changed.
    optimizer.add_variable_from_reference = recording
    with tf.device("/cpu:0"):
        optimizer.build(model.trainable_variables)
    return tuple(
        VariableInfo(v.path, _shape(v.shape), _itemsize(v.dtype), False, owners.get(id(v)))
        for v in optimizer.variables
    )


def _shape(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def _elements(shape: Any) -> int:
    return int(np.prod([d or 1 for d in tuple(shape)[1:]], dtype=np.int64))


def _itemsize(dtype: Any) -> int:
    return tf.as_dtype(keras.backend.standardize_dtype(dtype)).size
