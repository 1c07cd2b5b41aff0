"""A trained model ready to serve: `load(path)` and `ServableModel`.

`load` accepts three kinds of path:

- a `tfscale-train` workdir (it has `checkpoints/` or `config.json`): the
  model named by the workdir's `config.json` (or by `config_path`) is built
  and given the latest checkpoint's weights; the version is that
  checkpoint's epoch.
- a `.keras` file (`keras.saving.load_model`).
- a SavedModel directory (it has `saved_model.pb`): its `serving_default`
  signature; in TensorFlow Serving's layout (`BASE/NAME/VERSION/`), the
  directory's number is the version.

Names a client sends and receives (as in a TensorFlow Serving
`PredictRequest`): a SavedModel's are its signature's. A Keras model's
inputs are its named inputs (the keys of a dict-input model, else the
`keras.Input(name=...)` names); an input left with Keras's generated name
(a `Sequential`'s, such as every `tfscale-train` model's) is `"input"`, or
`"input_<i>"` among several. Outputs are a dict-output model's keys, else
`"output_0"`, `"output_1"`, ... (the names `keras.Model.export` gives).

Example:

```python
from tfscale.serve import model as model_lib

servable = model_lib.load("/tmp/tfscale/smoke")  # a tfscale-train workdir
servable.warm_up([1, 8, 32])  # the batcher's batch sizes
outputs = servable.predict({"input": images})  # images: float32 (8, 28, 28, 1)
outputs["output_0"].shape  # (8, 10)
if model_lib.latest_version("/tmp/tfscale/smoke") > servable.version:
    servable = model_lib.load("/tmp/tfscale/smoke")  # a newer checkpoint
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import re
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Iterator
from typing import Mapping
from typing import Optional
from typing import Sequence

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from tfscale.data import sources
from tfscale.train import callbacks as callbacks_lib
from tfscale.train import lib as train_lib
from tfscale.train import models

__all__ = [
    "KINDS",
    "LoadError",
    "ServableModel",
    "Signature",
    "TensorSpec",
    "latest_version",
    "load",
]

# One input or output: its dtype and its shape without the batch dimension
# (None where the model takes any size).
TensorSpec = tuple[np.dtype, tuple[Optional[int], ...]]
# The traced function: named batched inputs to named batched outputs.
ServeFn = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]

KINDS = ("workdir", "keras", "saved_model")
SIGNATURE_KEY = "serving_default"
_KERAS_SUFFIX = ".keras"
_SAVED_MODEL_FILE = "saved_model.pb"
# Names Keras makes up for an unnamed input (a Sequential's, keras.Input()'s).
_GENERATED_INPUT_NAME = re.compile(r"^(keras_tensor|input_layer|input)(_\d+)?$")


class LoadError(ValueError):
    """A path that cannot be served: missing, of no known format, or unreadable."""


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a model takes and returns, by name.

    Attributes:
      inputs: input name -> (dtype, shape without the batch dimension).
      outputs: output name -> (dtype, shape without the batch dimension).
    """

    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]


class ServableModel:
    """A model that answers batched requests, compiled once per batch size.

    `predict` runs a `tf.function` that is traced on the first batch of
    each size (static shapes: a batcher pads to a few allowed sizes) and
    reused after; `warm_up` pays those traces before the first request.

    Args:
      name: the model name clients ask for.
      version: the model version (see `load`).
      signature: the inputs and outputs `fn` takes and returns.
      fn: named batched input tensors -> named batched output tensors.
      kind: where the model came from, one of `KINDS`.
      source: the path it was loaded from.
      owner: an object `fn` needs alive (a loaded SavedModel).

    Example:

    ```python
    servable = ServableModel.from_keras(keras_model, name="lenet")
    servable.warm_up([1, 8])
    servable.predict({"input": np.zeros((8, 28, 28, 1), np.float32)})["output_0"]
    ```
    """

    def __init__(
        self,
        name: str,
        version: int,
        signature: Signature,
        fn: ServeFn,
        *,
        kind: str = "keras",
        source: str = "",
        owner: Any = None,
    ):
        if not name or not isinstance(name, str):
            raise ValueError(f"name must be a non-empty string. Received: name={name!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be a non-negative int. Received: version={version!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}. Received: kind={kind!r}")
        if not signature.inputs or not signature.outputs:
            raise ValueError(
                "signature must name at least one input and one output. "
                f"Received: inputs={list(signature.inputs)}, outputs={list(signature.outputs)}"
            )
        self._name = name
        self._version = version
        self._signature = signature
        self._kind = kind
        self._source = source
        self._owner = owner
        self._function = tf.function(fn)

    @classmethod
    def from_keras(
        cls,
        model: keras.Model,
        *,
        name: str,
        version: int = 1,
        kind: str = "keras",
        source: str = "",
    ) -> ServableModel:
        """Serves a Keras model; input and output names as in the module docstring.

        Raises:
          LoadError: for a model whose inputs are not defined (a subclassed
            model never called on `keras.Input`s).
        """
        try:
            # A Sequential has one input; its `input` is not defined until called.
            structure = model.inputs[0] if isinstance(model, keras.Sequential) else model.input
        except (AttributeError, IndexError, TypeError, ValueError) as e:
            raise LoadError(
                f"Keras model {model.name!r} has no defined inputs ({e}); "
                "build it on keras.Input (a functional model, or a Sequential that starts with one)"
            ) from None
        names, arrange = _keras_inputs(structure)
        tensors = tf.nest.flatten(structure)
        inputs = {n: _spec(t.dtype, t.shape) for n, t in zip(names, tensors)}
        outputs = _named(model.compute_output_spec(structure))
        signature = Signature(inputs, {n: _spec(t.dtype, t.shape) for n, t in outputs.items()})

        def serve(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return _named(model(arrange(features), training=False))

        return cls(name, version, signature, serve, kind=kind, source=source, owner=model)

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        return self._version

    @property
    def signature(self) -> Signature:
        return self._signature

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def source(self) -> str:
        return self._source

    @property
    def tracing_count(self) -> int:
        """How many times `predict`'s function was traced (one per batch size seen)."""
        return self._function.experimental_get_tracing_count()

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Runs one batch.

        Args:
          inputs: every input name -> an array of `(batch, *shape)`, the same
            batch for all; values are cast to the input's dtype where numpy
            casts within the kind (float64 to float32, int to float).

        Returns:
          Every output name -> its `(batch, ...)` array.

        Raises:
          ValueError: for missing or unknown names, a shape or dtype the
            signature does not take, or unequal batch sizes.
        """
        tensors = self._check(inputs)
        return {k: v.numpy() for k, v in self._function(tensors).items()}

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Runs a batch of zeros at each size, so no request pays a trace.

        One trace per size is the point here, so TensorFlow's warning about
        frequent retracing is held back meanwhile.

        Raises:
          ValueError: for a batch size that is not a positive int.
        """
        sizes = list(batch_sizes)
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"Batch sizes must be positive ints. Received: {size!r}")
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            for size in sizes:
                self.predict(
                    {
                        name: np.zeros((int(size), *[d or 1 for d in shape]), dtype)
                        for name, (dtype, shape) in self._signature.inputs.items()
                    }
                )
        finally:
            logger.setLevel(level)

    def metadata(self) -> dict[str, Any]:
        """The model and its signature as plain JSON-able values.

        Shapes include the batch dimension, with -1 for any size (as in a
        TensorFlow Serving `TensorShapeProto`); dtypes are numpy names.

        Example:

        ```python
        servable.metadata()["signature_def"]["inputs"]
        # {"input": {"dtype": "float32", "shape": [-1, 28, 28, 1]}}
        ```
        """
        return {
            "name": self._name,
            "version": self._version,
            "kind": self._kind,
            "source": self._source,
            "signature_name": SIGNATURE_KEY,
            "signature_def": {
                "method_name": "tensorflow/serving/predict",
                "inputs": _describe(self._signature.inputs),
                "outputs": _describe(self._signature.outputs),
            },
        }

    def _check(self, inputs: Mapping[str, Any]) -> dict[str, tf.Tensor]:
        expected = self._signature.inputs
        if not isinstance(inputs, Mapping) or set(inputs) != set(expected):
            received = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(
                f"Model {self._name!r} takes inputs {sorted(expected)}. Received: {received}"
            )
        tensors, batches = {}, {}
        for name, (dtype, shape) in expected.items():
            value = np.asarray(inputs[name])
            if not np.can_cast(value.dtype, dtype, casting="same_kind"):
                raise ValueError(
                    f"Input {name!r} of model {self._name!r} must be {dtype.name}. "
                    f"Received: dtype={value.dtype.name}"
                )
            if value.ndim != len(shape) + 1 or any(
                want is not None and want != got for want, got in zip(shape, value.shape[1:])
            ):
                wanted = ", ".join("?" if d is None else str(d) for d in shape)
                raise ValueError(
                    f"Input {name!r} of model {self._name!r} must have shape "
                    f"(batch, {wanted}). Received: shape={value.shape}"
                )
            batches[name] = value.shape[0]
            tensors[name] = tf.constant(value.astype(dtype, copy=False))
        if len(set(batches.values())) != 1 or not next(iter(batches.values())):
            raise ValueError(
                f"Inputs of model {self._name!r} must share one positive batch size. "
                f"Received: {batches}"
            )
        return tensors

    def __repr__(self) -> str:
        inputs = ", ".join(f"{n}={_spec_str(s)}" for n, s in self._signature.inputs.items())
        return (
            f"ServableModel(name={self._name!r}, version={self._version}, kind={self._kind!r}, "
            f"inputs=[{inputs}])"
        )


def load(
    path: str,
    *,
    name: Optional[str] = None,
    config_path: Optional[str] = None,
    config_overrides: Optional[Mapping[str, Any]] = None,
    image_shape: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
) -> ServableModel:
    """Loads a workdir's latest checkpoint, a `.keras` file or a SavedModel.

    Versions: a workdir's is its latest checkpoint's epoch; a SavedModel's
    is its directory's name when that is a number (TensorFlow Serving's
    `NAME/VERSION/` layout); otherwise, and for a `.keras` file, the file's
    modification time in whole seconds since the epoch, so a replaced file
    gets a higher version.

    Args:
      path: a `tfscale-train` workdir, a `.keras` file or a SavedModel dir.
      name: the model name; default: the workdir's or file's base name
        (without `.keras`), a versioned SavedModel's parent directory name.
      config_path: workdirs only: the training config `FILE.py[:variant]`
        to use instead of the workdir's `config.json` (needed where a
        workdir has none).
      config_overrides: workdirs only: `{"a.b": value}` config changes, e.g.
        `{"data.cache_dir": "/data/cache"}`.
      image_shape: workdirs only: the model's input shape, e.g. `(28, 28, 1)`.
      num_classes: workdirs only: the model's classes. Without both, they
        come from the config's data source (`tfscale.data.sources`), which
        must then be readable here.

    Raises:
      LoadError: one line naming the path or file at fault: a path that
        does not exist or is of no known kind, a workdir without a
        checkpoint or config, an unreadable checkpoint, `.keras` file or
        SavedModel.
    """
    kind = _kind(path)
    if kind != "workdir" and (config_path or config_overrides or image_shape or num_classes):
        raise LoadError(
            "config_path, config_overrides, image_shape and num_classes apply to workdirs only. "
            f"Received: a {kind} at {path}"
        )
    if kind == "workdir":
        return _load_workdir(path, name, config_path, config_overrides, image_shape, num_classes)
    if kind == "keras":
        return _load_keras(path, name)
    return _load_saved_model(path, name)


def latest_version(path: str) -> int:
    """The version `load(path)` would give now, from metadata only.

    For a workdir, the latest checkpoint's epoch (0 before the first one),
    so a server can poll for a newer checkpoint.

    Raises:
      LoadError: for a path that does not exist or is of no known kind.
    """
    kind = _kind(path)
    if kind == "workdir":
        state = _backup_state(path)
        return int(state["epoch"]) if state else 0
    if kind == "saved_model":
        base = os.path.basename(os.path.normpath(path))
        if base.isdigit():
            return int(base)
        return int(os.path.getmtime(os.path.join(path, _SAVED_MODEL_FILE)))
    return int(os.path.getmtime(path))


def _kind(path: str) -> str:
    if not os.path.exists(path):
        raise LoadError(f"No model at {path}: the path does not exist")
    if os.path.isdir(path):
        # A run in its first epoch has written config.json but no checkpoints/ yet.
        if any(
            os.path.exists(os.path.join(path, entry))
            for entry in (train_lib.CHECKPOINTS_DIR, train_lib.CONFIG_FILE)
        ):
            return "workdir"
        if os.path.isfile(os.path.join(path, _SAVED_MODEL_FILE)):
            return "saved_model"
    elif path.endswith(_KERAS_SUFFIX):
        return "keras"
    raise LoadError(
        f"{path} is not a model: expected a tfscale-train workdir (with "
        f"{train_lib.CHECKPOINTS_DIR}/ or {train_lib.CONFIG_FILE}), a {_KERAS_SUFFIX} file "
        f"or a SavedModel directory (with {_SAVED_MODEL_FILE})"
    )


def _load_workdir(
    workdir: str,
    name: Optional[str],
    config_path: Optional[str],
    overrides: Optional[Mapping[str, Any]],
    image_shape: Optional[Sequence[int]],
    num_classes: Optional[int],
) -> ServableModel:
    state = _backup_state(workdir)
    checkpoints = os.path.join(workdir, train_lib.CHECKPOINTS_DIR)
    if not state:
        raise LoadError(
            f"Workdir {workdir} has no checkpoint yet ({checkpoints} has no "
            f"state file): serve it after its first epoch"
        )
    config = _workdir_config(workdir, config_path, overrides)
    if image_shape is None or num_classes is None:
        image_shape, num_classes = _data_shape(config, image_shape, num_classes)
    weights = os.path.join(checkpoints, str(state.get("weights")))
    with _dtype_policy(config.training.precision):
        try:
            model = models.build(
                config.model.name, tuple(image_shape), num_classes, **config.model.kwargs.to_dict()
            )
        except (ValueError, TypeError) as e:
            raise LoadError(f"Cannot build the model of workdir {workdir}: {e}") from None
    try:
        model.load_weights(weights)
    except Exception as e:  # pylint: disable=broad-except
        raise LoadError(
            f"Checkpoint {weights} (epoch {state.get('epoch')}) cannot be read into a "
            f"{config.model.name!r} model (is it the config it was trained with?): "
            f"{_first_line(e)}"
        ) from None
    return ServableModel.from_keras(
        model,
        name=name or os.path.basename(os.path.normpath(workdir)),
        version=int(state["epoch"]),
        kind="workdir",
        source=workdir,
    )


def _load_keras(path: str, name: Optional[str]) -> ServableModel:
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # pylint: disable=broad-except
        raise LoadError(f"Keras file {path} cannot be loaded: {_first_line(e)}") from None
    return ServableModel.from_keras(
        model,
        name=name or os.path.basename(path)[: -len(_KERAS_SUFFIX)],
        version=latest_version(path),
        source=path,
    )


def _load_saved_model(path: str, name: Optional[str]) -> ServableModel:
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:  # pylint: disable=broad-except
        raise LoadError(f"SavedModel {path} cannot be loaded: {_first_line(e)}") from None
    if SIGNATURE_KEY not in loaded.signatures:
        raise LoadError(
            f"SavedModel {path} has no {SIGNATURE_KEY!r} signature. "
            f"Received signatures: {sorted(loaded.signatures) or 'none'}"
        )
    function = loaded.signatures[SIGNATURE_KEY]
    _, kwargs = function.structured_input_signature
    inputs = {k: _spec(s.dtype, s.shape) for k, s in kwargs.items()}
    outputs = {k: _spec(s.dtype, s.shape) for k, s in function.structured_outputs.items()}
    directory = os.path.normpath(path)
    if name is None:
        base = os.path.basename(directory)
        name = os.path.basename(os.path.dirname(directory)) if base.isdigit() else base

    def serve(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return function(**features)

    return ServableModel(
        name,
        latest_version(path),
        Signature(inputs, outputs),
        serve,
        kind="saved_model",
        source=path,
        owner=loaded,
    )


def _backup_state(workdir: str) -> Optional[dict[str, Any]]:
    checkpoints = os.path.join(workdir, train_lib.CHECKPOINTS_DIR)
    try:
        return callbacks_lib.read_backup_state(checkpoints)
    except (OSError, ValueError) as e:
        raise LoadError(f"Checkpoint state in {checkpoints} cannot be read: {e}") from None


def _workdir_config(
    workdir: str, config_path: Optional[str], overrides: Optional[Mapping[str, Any]]
) -> ml_collections.ConfigDict:
    """The config from `config_path`, else the workdir's config.json, with `overrides`."""
    saved = os.path.join(workdir, train_lib.CONFIG_FILE)
    if config_path is not None:
        config = _config_from_file(config_path)
    elif os.path.isfile(saved):
        try:
            with open(saved) as f:
                config = ml_collections.ConfigDict(json.load(f))
        except (OSError, ValueError) as e:
            raise LoadError(f"Config {saved} cannot be read: {e}") from None
    else:
        raise LoadError(
            f"Workdir {workdir} has no {train_lib.CONFIG_FILE}: pass the config it was "
            "trained with as config_path='FILE.py[:variant]'"
        )
    for key in overrides or {}:
        section, _, field = key.rpartition(".")
        parent = config
        for part in section.split(".") if section else ():
            parent = parent.get(part) if isinstance(parent, ml_collections.ConfigDict) else None
        if not isinstance(parent, ml_collections.ConfigDict) or field not in parent:
            raise LoadError(f"config_overrides must name existing config fields. Received: {key!r}")
    config.update_from_flattened_dict(dict(overrides or {}))
    return config


def _config_from_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a config file named `FILE.py[:variant]`."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise LoadError(f"config_path must name a config file. Received: {spec!r}")
    try:
        module_spec = importlib.util.spec_from_file_location("tfscale_serve_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except Exception as e:  # pylint: disable=broad-except
        raise LoadError(f"Config {spec} cannot be loaded: {_first_line(e)}") from None


def _data_shape(
    config: ml_collections.ConfigDict,
    image_shape: Optional[Sequence[int]],
    num_classes: Optional[int],
) -> tuple[Sequence[int], int]:
    """The input shape and classes of the config's data source (the workdir lacks them)."""
    try:
        split = sources.load_split(
            config.data.source,
            config.data.eval_split,
            cache_dir=config.data.cache_dir,
            tfds_data_dir=config.data.tfds_data_dir,
        )
    except (ValueError, OSError) as e:
        raise LoadError(
            f"The model's input shape comes from its data source, which cannot be read "
            f"here ({_first_line(e)}); pass image_shape= and num_classes="
        ) from None
    return image_shape or split.image_shape, num_classes or split.num_classes


@contextlib.contextmanager
def _dtype_policy(policy: Optional[str]) -> Iterator[None]:
    """Builds under the training's dtype policy, so the served model computes alike."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy or "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _keras_inputs(structure: Any) -> tuple[list[str], Callable[[dict[str, Any]], Any]]:
    """The served input names, and how named features become the model's input."""
    if isinstance(structure, Mapping):
        names = list(structure)
        return names, lambda features: {n: features[n] for n in names}
    tensors = tf.nest.flatten(structure)
    names = []
    for i, tensor in enumerate(tensors):
        generated = _GENERATED_INPUT_NAME.match(tensor.name or "")
        default = "input" if len(tensors) == 1 else f"input_{i}"
        names.append(default if generated else tensor.name)
    if len(set(names)) != len(names):
        raise LoadError(f"Keras model inputs need distinct names. Received: {names}")
    return names, lambda features: tf.nest.pack_sequence_as(structure, [features[n] for n in names])


def _named(outputs: Any) -> dict[str, Any]:
    if isinstance(outputs, Mapping):
        return dict(outputs)
    return {f"output_{i}": t for i, t in enumerate(tf.nest.flatten(outputs))}


def _spec(dtype: Any, shape: Any) -> TensorSpec:
    """(numpy dtype, shape without batch) of a KerasTensor's or TensorSpec's."""
    dims = tuple(tf.TensorShape(shape).as_list())
    return np.dtype(tf.as_dtype(dtype).as_numpy_dtype), dims[1:]


def _describe(specs: Mapping[str, TensorSpec]) -> dict[str, dict[str, Any]]:
    return {
        name: {"dtype": dtype.name, "shape": [-1, *[-1 if d is None else d for d in shape]]}
        for name, (dtype, shape) in specs.items()
    }


def _spec_str(spec: TensorSpec) -> str:
    dtype, shape = spec
    return f"{dtype.name}{list(shape)}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
