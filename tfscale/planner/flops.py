"""Forward FLOPs per example of each layer of a Keras model, from its layer graph.

The step-time model needs the arithmetic a training step does and which
part of it a layout splits. Both come from the layers' kernel shapes and
output shapes, read off a model built on the host (no tracing, no run):

- a layer with a `kernel` (Dense, ConvND, ...): `2 * kernel.size *
  output_elements / kernel.shape[-1]`: one multiply-add per kernel element
  at every output position (a Dense over a sequence, a convolution's
  spatial positions). A depthwise convolution: `2 * kh * kw * output_elements`.
- `EinsumDense`: `2 * kernel.size * output_elements / (output dims of the
  kernel)`, the kernel's output dims read off the layer's equation.
- `MultiHeadAttention`: its four projections as `EinsumDense`, plus the
  scores and the weighted sum, `2 * heads * Tq * Tk * (key_dim + value_dim)`
  for `Tq` query and `Tk` key positions.
- `Embedding`: a lookup, one per output element.
- any other layer: one per output element (norms, activations, pooling);
  these are memory-bound and small beside the matmuls.

A model without a layer graph (subclassed) has no layers to read: with an
example input it is traced and the FLOPs of the matmuls, convolutions and
einsums in its TF graph are summed (`traced_flops`); without one, two per
trainable parameter, as for an MLP.

Example:

```python
for cost in layer_costs(model):
    print(cost.name, cost.flops, [path for path, _ in cost.kernels])
```
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "LayerCost",
    "forward_ops",
    "layer_costs",
    "traced_flops",
]

# Ops that dispatch nothing at run time (or that grappler folds away).
_FREE_OPS = ("Placeholder", "Const", "NoOp", "Identity")

# The weights whose layout decides whether a layer's work is split.
_KERNELS = ("kernel", "embeddings", "depthwise_kernel", "pointwise_kernel")


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One layer's forward work for one example.

    Attributes:
      name: the layer.
      flops: forward FLOPs per example (a multiply-add is two).
      output_elements: elements of its output per example.
      output_itemsize: bytes per output element (the layer's compute dtype).
      kernels: path and shape of its kernels and embedding tables, in weight
        order (sublayers included): a layout that splits one splits the
        layer's work; the last one decides how its output is laid out.
      consumers: the layers that take its output.
      matmuls: kernels applied (a fixed per-op cost each, per pass).
    """

    name: str
    flops: int
    output_elements: int
    output_itemsize: int
    kernels: tuple[tuple[str, tuple[int, ...]], ...] = ()
    consumers: tuple[str, ...] = ()

    @property
    def matmuls(self) -> int:
        return len(self.kernels)


def layer_costs(model: keras.Model) -> tuple[LayerCost, ...]:
    """The cost of each layer of a functional or Sequential model, nested models expanded.

    Args:
      model: a built model with a layer graph.

    Returns:
      One `LayerCost` per layer that is not an input; `()` for a model
      without a layer graph.

    Example:

    ```python
    costs = layer_costs(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)]))
    costs[0].flops   # 2 * 8 * 4 = 64
    ```
    """
    try:
        layers = list(model.layers)
        if not model.inputs:
            return ()
    except (AttributeError, ValueError):
        return ()
    found: list[LayerCost] = []
    for layer in layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            found.extend(layer_costs(layer))
            continue
        cost = _cost(layer)
        if cost is None:  # a layer with no output in the graph: no layer graph
            return ()
        found.append(cost)
    return tuple(found)


def traced_flops(model: keras.Model, sample_input: Any) -> int:
    """Forward FLOPs per example of `model(sample_input)`, from its traced TF graph.

    Counts `MatMul`, `BatchMatMul*`, `Conv*D` and `Einsum` ops (two per
    multiply-add), divided by the sample's batch size (the first dimension
    of its first tensor).

    Example:

    ```python
    traced_flops(subclassed_model, np.zeros((4, 28, 28, 1), "float32"))
    ```
    """
    inputs = keras.tree.map_structure(tf.convert_to_tensor, sample_input)
    batch = int(keras.tree.flatten(inputs)[0].shape[0] or 1)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(inputs).graph
    return sum(_op_flops(op) for op in graph.get_operations()) // batch


def forward_ops(model: keras.Model, sample_input: Any = None) -> int:
    """Ops of a training-mode forward pass of `model`, from its traced TF graph.

    What a step dispatches grows with it (the backward pass and the
    optimizer update follow the forward ops), so the planner's per-step
    overhead is charged per forward op. Traced on symbolic inputs of the
    model's input shapes (batch unknown), or on `sample_input` for a model
    without them (subclassed).

    Returns:
      The count, leaving out constants, placeholders and identities; 0 for
      a model with neither inputs nor a sample.

    Example:

    ```python
    forward_ops(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)]))
    # 4: the kernel and bias reads, MatMul, BiasAdd
    ```
    """
    if sample_input is not None:
        args = keras.tree.map_structure(tf.convert_to_tensor, sample_input)
    else:
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):
            inputs = None
        if not inputs:
            return 0
        specs = [
            tf.TensorSpec((None, *t.shape[1:]), keras.backend.standardize_dtype(t.dtype))
            for t in inputs
        ]
        args = specs[0] if len(specs) == 1 else specs
    graph = tf.function(lambda x: model(x, training=True)).get_concrete_function(args).graph
    return sum(op.type not in _FREE_OPS for op in graph.get_operations())


def _cost(layer: keras.layers.Layer) -> Optional[LayerCost]:
    try:
        outputs = keras.tree.flatten(layer.output)
    except (AttributeError, ValueError):
        return None
    elements = sum(_elements(t.shape) for t in outputs)
    itemsize = tf.as_dtype(keras.backend.standardize_dtype(outputs[0].dtype)).size
    kernels = tuple(
        (w.path, tuple(int(d) for d in w.shape))
        for w in layer.weights
        if w.path.rsplit("/", 1)[-1] in _KERNELS
    )
    consumers = tuple(
        dict.fromkeys(n.operation.name for n in getattr(layer, "_outbound_nodes", ()))
    )
    return LayerCost(layer.name, _flops(layer, elements), elements, itemsize, kernels, consumers)


def _flops(layer: keras.layers.Layer, elements: int) -> int:
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return _attention_flops(layer)
    if isinstance(layer, keras.layers.EinsumDense):
        return _einsum_dense_flops(layer, elements)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel.shape[:2]
        return 2 * int(kh) * int(kw) * elements
    kernel = getattr(layer, "kernel", None)
    if kernel is not None and len(kernel.shape) >= 2:
        return 2 * _size(kernel.shape) * elements // int(kernel.shape[-1])
    return elements


def _einsum_dense_flops(layer: keras.layers.EinsumDense, elements: int) -> int:
    inputs, output = layer.equation.split("->")
    kernel_letters = inputs.split(",")[1]
    shape = tuple(int(d) for d in layer.kernel.shape)
    kept = [d for letter, d in zip(kernel_letters, shape) if letter in output]
    return 2 * _size(shape) * elements // max(1, _size(kept))


def _attention_flops(layer: keras.layers.MultiHeadAttention) -> int:
    tensors = keras.tree.flatten(layer._inbound_nodes[0].input_tensors)
    query = _positions(tensors[0].shape)
    key = _positions(tensors[1].shape if len(tensors) > 1 else tensors[0].shape)
    projections = sum(
        2 * _size(dense.kernel.shape) * positions
        for dense, positions in (
            (layer._query_dense, query),
            (layer._key_dense, key),
            (layer._value_dense, key),
            (layer._output_dense, query),
        )
    )
    heads = layer._num_heads
    return projections + 2 * heads * query * key * (layer._key_dim + layer._value_dim)


def _op_flops(op: tf.Operation) -> int:
    kind = op.type
    if kind == "MatMul" or kind.startswith("BatchMatMul"):
        a, b = (_known(t.shape) for t in op.inputs[:2])
        if a is None or b is None:
            return 0
        transpose_a = op.get_attr("transpose_a" if kind == "MatMul" else "adj_x")
        contracted = a[-2] if transpose_a else a[-1]
        return 2 * contracted * _size(_known(op.outputs[0].shape) or ())
    if kind.startswith("Conv") and kind[4:6] in ("2D", "3D", "1D"):
        kernel, out = _known(op.inputs[1].shape), _known(op.outputs[0].shape)
        if kernel is None or out is None:
            return 0
        return 2 * _size(kernel[:-1]) * _size(out)
    if kind == "Einsum":
        equation = op.get_attr("equation").decode()
        sizes: dict[str, int] = {}
        for letters, tensor in zip(equation.split("->")[0].split(","), op.inputs):
            for letter, dim in zip(letters, tensor.shape):
                if letter in string.ascii_letters and dim is not None:
                    sizes[letter] = int(dim)
        return 2 * _size(list(sizes.values()))
    return 0


def _known(shape: tf.TensorShape) -> Optional[tuple[int, ...]]:
    if shape.rank is None or any(d is None for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _positions(shape: Any) -> int:
    return _size([d or 1 for d in tuple(shape)[1:-1]])


def _elements(shape: Any) -> int:
    return _size([d or 1 for d in tuple(shape)[1:]])


def _size(shape: Any) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64))
