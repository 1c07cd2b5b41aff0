"""Keras models for image classification, by name.

- `"lenet"`: conv 10@5x5, max-pool 2, relu; conv 20@5x5, max-pool 2, relu;
  flatten (320 on 28x28); dense 50 relu; dense 10 log-softmax.
- `"convnet"`: conv 32@3x3 relu; conv 64@3x3 relu; flatten; dense 64 relu;
  dense 10 softmax.
- `"transformer"`: each image row is a token; a small pre-norm encoder
  (multi-head attention + MLP blocks) and a mean-pooled classifier head.
  Layer names (`block0_attention`, `block0_mlp_up`, `block0_mlp_down`, ...)
  are stable so that sharding rules can match them.

Example:

```python
model = models.build("lenet", input_shape=(28, 28, 1), num_classes=10)
model.compile(optimizer="sgd", loss=models.loss("lenet"), metrics=["accuracy"])
```
"""

from __future__ import annotations

from typing import Any
from typing import Callable

import keras

__all__ = [
    "MODELS",
    "PositionEmbedding",
    "build",
    "loss",
]


@keras.saving.register_keras_serializable(package="tfscale")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding for each position of a `(batch, seq, dim)` input."""

    def build(self, input_shape: tuple[int, ...]) -> None:
        self.embedding = self.add_weight(
            name="embedding",
            shape=(input_shape[-2], input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, inputs: Any) -> Any:
        return inputs + self.embedding


def lenet(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Network (a): two conv/pool/relu stages, dense 50, log-softmax."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(10, 5, name="conv1"),
            layers.MaxPooling2D(2),
            layers.ReLU(),
            layers.Conv2D(20, 5, name="conv2"),
            layers.MaxPooling2D(2),
            layers.ReLU(),
            layers.Flatten(),
            layers.Dense(50, activation="relu", name="fc1"),
            layers.Dense(num_classes, name="fc2"),
            # Outputs stay float32 under a mixed-precision policy.
            layers.Activation("log_softmax", dtype="float32"),
        ],
        name="lenet",
    )


def convnet(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Network (b): conv 32, conv 64, dense 64, softmax."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(32, 3, activation="relu", name="conv1"),
            layers.Conv2D(64, 3, activation="relu", name="conv2"),
            layers.Flatten(),
            layers.Dense(64, activation="relu", name="fc1"),
            layers.Dense(num_classes, activation="softmax", name="fc2", dtype="float32"),
        ],
        name="convnet",
    )


def transformer(
    input_shape: tuple[int, ...],
    num_classes: int,
    model_dim: int = 64,
    num_heads: int = 4,
    mlp_dim: int = 128,
    num_layers: int = 2,
) -> keras.Model:
    """A small encoder classifier: image rows are tokens."""
    if model_dim % num_heads:
        raise ValueError(
            f"model_dim must be a multiple of num_heads. "
            f"Received: model_dim={model_dim}, num_heads={num_heads}"
        )
    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = layers.Reshape((input_shape[0], -1))(inputs)
    x = layers.Dense(model_dim, name="embed")(x)
    x = PositionEmbedding(name="position")(x)
    for i in range(num_layers):
        h = layers.LayerNormalization(name=f"block{i}_norm1")(x)
        h = layers.MultiHeadAttention(
            num_heads, model_dim // num_heads, name=f"block{i}_attention"
        )(h, h)
        x = layers.Add()([x, h])
        h = layers.LayerNormalization(name=f"block{i}_norm2")(x)
        h = layers.Dense(mlp_dim, activation="gelu", name=f"block{i}_mlp_up")(h)
        h = layers.Dense(model_dim, name=f"block{i}_mlp_down")(h)
        x = layers.Add()([x, h])
    x = layers.LayerNormalization(name="final_norm")(x)
    x = layers.GlobalAveragePooling1D()(x)
    outputs = layers.Dense(num_classes, name="head", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="transformer")


# name -> (builder, whether the output is log-probabilities or logits)
MODELS: dict[str, tuple[Callable[..., keras.Model], bool]] = {
    "lenet": (lenet, True),
    "convnet": (convnet, False),
    "transformer": (transformer, True),
}


def build(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any) -> keras.Model:
    """Builds a model by name.

    Args:
      name: one of `MODELS`.
      input_shape: shape of one example, e.g. `(28, 28, 1)`.
      num_classes: number of output classes.
      **kwargs: options of that model (e.g. `model_dim` for `"transformer"`).

    Raises:
      ValueError: for an unknown name.
    """
    return _lookup(name)[0](input_shape, num_classes, **kwargs)


def loss(name: str) -> keras.losses.Loss:
    """The classification loss that matches the model's output.

    Log-softmax outputs and logits both take `from_logits=True`: the softmax
    of log-probabilities gives the probabilities back, so this is the
    negative log-likelihood.
    """
    return keras.losses.SparseCategoricalCrossentropy(from_logits=_lookup(name)[1])


def _lookup(name: str) -> tuple[Callable[..., keras.Model], bool]:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(sorted(MODELS))}")
    return MODELS[name]
