"""TensorFlow Serving's wire formats for a serving replica, as numpy arrays.

gRPC: `from_tensor_proto` checks a client's `TensorProto` (from a
`PredictRequest`) before `tf.make_ndarray` reads it; `to_tensor_proto`
writes an output back. REST: `parse_rest_predict` reads the predict API's
JSON body (row `{"instances": ...}` or columnar `{"inputs": ...}`) into
batched arrays of the model's input dtypes; `rest_predict_response` answers
in the same form. Bad client data raises `TensorError`, naming the input,
what was expected and what was received. Shapes are left to the batcher
(`batching.InvalidRequest`).

Example:

```python
inputs = {"x": (np.dtype(np.float32), (3,))}
arrays, form = parse_rest_predict(b'{"instances": [[1, 2, 3], [4, 5, 6]]}', inputs)
arrays["x"].shape  # (2, 3), float32; form == "row"
rest_predict_response({"y": np.array([0.5, np.nan])}, form)
# b'{"predictions": [0.5, "NaN"]}'

x = from_tensor_proto("x", request.inputs["x"])  # a gRPC PredictRequest
response.outputs["y"].CopyFrom(to_tensor_proto(y))
```
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import TYPE_CHECKING
from typing import Any
from typing import Mapping

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2

if TYPE_CHECKING:
    from tfscale.serve.model import TensorSpec

__all__ = [
    "FORMS",
    "MAX_ELEMENTS",
    "SIGNATURE_NAME",
    "TensorError",
    "from_tensor_proto",
    "parse_rest_predict",
    "rest_error",
    "rest_predict_response",
    "to_tensor_proto",
]

# The REST request forms, and so the response forms.
FORMS = ("row", "columnar")
# The only signature a replica serves.
SIGNATURE_NAME = "serving_default"
# Most elements a received tensor may claim: a forged shape allocates no gigabytes.
MAX_ELEMENTS = 1 << 28

_BFLOAT16 = np.dtype(tf.bfloat16.as_numpy_dtype)
# DataType enum -> the TensorProto field its values are listed in.
_VALUE_FIELDS = {
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_HALF: "half_val",
    types_pb2.DT_BFLOAT16: "half_val",
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_COMPLEX64: "scomplex_val",
    types_pb2.DT_COMPLEX128: "dcomplex_val",
    types_pb2.DT_STRING: "string_val",
}
_COMPLEX = (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128)
# Strict JSON has no NaN or infinity: responses spell them so, requests may
# (or use the bare tokens TensorFlow Serving writes, which `json` also reads).
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class TensorError(ValueError):
    """Bad client data: the message names the input and what was wrong with it."""


def _dtype_name(enum: int) -> str:
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"the unknown dtype number {enum}"


def from_tensor_proto(
    name: str, proto: tensor_pb2.TensorProto, *, max_elements: int = MAX_ELEMENTS
) -> np.ndarray:
    """The array a client's `TensorProto` holds, checked before it is read.

    Args:
      name: the input's name, for error messages.
      proto: a tensor as in `PredictRequest.inputs[name]`.
      max_elements: most elements its shape may claim.

    Returns:
      The array; DT_STRING tensors come back as object arrays of bytes.

    Raises:
      TensorError: the dtype is not a data dtype, the shape is unknown,
        negative or larger than `max_elements`, or the values do not fill the
        shape (`tensor_content` of the wrong byte length; a value list neither
        one value, broadcast, nor one per element).
    """
    if proto.dtype not in _VALUE_FIELDS:
        supported = ", ".join(sorted(_dtype_name(d) for d in _VALUE_FIELDS))
        raise TensorError(
            f"input {name!r}: expected a tensor of one of {supported}, "
            f"received {_dtype_name(proto.dtype)}"
        )
    dtype = tf.as_dtype(proto.dtype)
    if proto.tensor_shape.unknown_rank:
        raise TensorError(f"input {name!r}: expected a known rank, received unknown_rank")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if any(size < 0 for size in shape):
        raise TensorError(f"input {name!r}: expected dimensions >= 0, received shape {shape}")
    elements = math.prod(shape)
    if elements > max_elements:
        raise TensorError(
            f"input {name!r}: expected at most {max_elements} elements, "
            f"received shape {shape} ({elements} elements)"
        )
    what = f"shape {shape} of {dtype.name}"
    if proto.tensor_content:
        if dtype == tf.string:
            raise TensorError(
                f"input {name!r}: expected DT_STRING values in string_val, received tensor_content"
            )
        expected = elements * dtype.size
        if len(proto.tensor_content) != expected:
            raise TensorError(
                f"input {name!r}: expected {expected} bytes of tensor_content for {what}, "
                f"received {len(proto.tensor_content)}"
            )
    else:
        field = _VALUE_FIELDS[proto.dtype]
        count = len(getattr(proto, field))
        if proto.dtype in _COMPLEX:
            count /= 2
        if count != elements and (count != 1 or elements == 0):
            allowed = f"1 or {elements}" if elements else "0"
            raise TensorError(
                f"input {name!r}: expected {allowed} values in {field} for {what}, "
                f"received {count:g}"
            )
    try:
        return tf.make_ndarray(proto)
    except (ValueError, TypeError, OverflowError) as e:
        raise TensorError(f"input {name!r}: expected a valid tensor for {what}: {e}") from e


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """A `TensorProto` of `array`: numbers in `tensor_content`, strings in `string_val`.

    Raises:
      ValueError: the array's dtype has no TensorFlow counterpart.
    """
    array = np.asarray(array)
    if array.dtype.kind in "OSU":
        try:
            return tf.make_tensor_proto(array)
        except (TypeError, ValueError) as e:
            raise ValueError(f"expected an array of str or bytes, received {array!r:.80}") from e
    array = array.astype(array.dtype.newbyteorder("="), copy=False)
    try:
        dtype = tf.as_dtype(array.dtype)
    except TypeError as e:
        raise ValueError(
            f"expected an array of a TensorFlow dtype, received dtype {array.dtype}"
        ) from e
    return tensor_pb2.TensorProto(
        dtype=dtype.as_datatype_enum,
        tensor_shape=tf.TensorShape(array.shape).as_proto(),
        tensor_content=array.tobytes(),
    )


def _describe(value: Any) -> str:
    """A JSON value as an error message shows it."""
    if isinstance(value, str):
        return f"the string {value!r:.60}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r:.60}"
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:8]}"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return "null" if value is None else f"{type(value).__name__} {value!r:.60}"


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and list(value) == ["b64"]


def _is_named(value: Any) -> bool:
    """Whether a JSON value is an object of input names (not a `{"b64": ...}` value)."""
    return isinstance(value, dict) and not _is_b64(value)


def _shape_and_leaves(name: str, value: Any) -> tuple[tuple[int, ...], list[Any]]:
    """The shape of nested JSON lists and their items in row-major order."""
    shape = []
    level = [value]
    while level:
        lists = sum(isinstance(item, list) for item in level)
        if not lists:
            break
        if lists != len(level):
            raise TensorError(
                f"input {name!r}: ragged values: expected only lists or only values "
                f"at depth {len(shape)}, received both"
            )
        lengths = sorted({len(item) for item in level})
        if len(lengths) > 1:
            raise TensorError(
                f"input {name!r}: ragged values: expected lists of one length at depth "
                f"{len(shape)}, received lengths {lengths[:8]}"
            )
        shape.append(lengths[0])
        level = [leaf for item in level for leaf in item]
    return tuple(shape), level


def _numbers(name: str, leaves: list[Any], dtype: np.dtype) -> np.ndarray:
    """Bools for bool, ints for int, numbers or NaN/infinity spellings for float dtypes."""
    floats = dtype.kind == "f" or dtype == _BFLOAT16
    if floats and any(isinstance(leaf, str) for leaf in leaves):
        leaves = [
            _SPECIAL_FLOATS.get(leaf, leaf) if isinstance(leaf, str) else leaf for leaf in leaves
        ]
    types = (int, float) if floats else (int,) if dtype.kind in "iu" else (bool,)
    for leaf in leaves:
        if type(leaf) not in types:
            raise TensorError(
                f"input {name!r}: expected {dtype.name} values, received {_describe(leaf)}"
            )
    try:
        wide = np.array(leaves, dtype=np.float64 if floats else dtype)
    except OverflowError:
        info = np.finfo(np.float64) if floats else np.iinfo(dtype)
        low, high = int(info.min), int(info.max)  # exact Python ints compare with any leaf
        bad = next(leaf for leaf in leaves if not low <= leaf <= high)
    else:
        with np.errstate(over="ignore"):
            array = wide.astype(dtype)
        overflow = np.isinf(array) & np.isfinite(wide)
        if not overflow.any():
            return array
        bad = leaves[int(np.argmax(overflow))]
    raise TensorError(
        f"input {name!r}: expected {dtype.name} values, received {_describe(bad)} (out of range)"
    )


def _strings(name: str, leaves: list[Any]) -> np.ndarray:
    """Strings as UTF-8 bytes, `{"b64": ...}` objects decoded."""
    values = np.empty(len(leaves), dtype=object)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, str):
            values[i] = leaf.encode("utf-8")
        elif _is_b64(leaf) and isinstance(leaf["b64"], str):
            try:
                values[i] = base64.b64decode(leaf["b64"], validate=True)
            except binascii.Error as e:
                raise TensorError(
                    f"input {name!r}: expected base64 in 'b64', received {leaf['b64']!r:.60}: {e}"
                ) from None
        else:
            raise TensorError(
                f'input {name!r}: expected string values or {{"b64": ...}} objects, '
                f"received {_describe(leaf)}"
            )
    return values


def _to_array(name: str, value: Any, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind not in "OSUbiuf" and dtype != _BFLOAT16:
        raise ValueError(
            f"input {name!r}: expected a bool, int, float or string dtype, got {dtype}"
        )
    shape, leaves = _shape_and_leaves(name, value)
    if dtype.kind in "OSU":
        return _strings(name, leaves).reshape(shape)
    return _numbers(name, leaves, dtype).reshape(shape)


def _check_names(given: Mapping[str, Any], inputs: Mapping[str, Any], where: str) -> None:
    unknown = [name for name in given if name not in inputs]
    missing = [name for name in inputs if name not in given]
    if unknown or missing:
        problem = f"unknown input {unknown[0]!r}" if unknown else f"missing input {missing[0]!r}"
        raise TensorError(f"{where}: {problem}; the model's inputs are {list(inputs)}")


def _row_columns(instances: Any, inputs: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Input name -> its values, one per instance."""
    if not isinstance(instances, list):
        raise TensorError(f"expected 'instances' to be a list, received {_describe(instances)}")
    if not instances:
        raise TensorError("expected at least one example in 'instances', received an empty list")
    names = list(inputs)
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for i, instance in enumerate(instances):
        if _is_named(instance):
            _check_names(instance, inputs, f"instance {i}")
            for name in names:
                columns[name].append(instance[name])
        elif len(names) == 1:
            columns[names[0]].append(instance)
        else:
            raise TensorError(
                f"instance {i}: expected an object with the inputs {names}, "
                f"received {_describe(instance)}"
            )
    return columns


def parse_rest_predict(
    body: bytes | str, inputs: Mapping[str, TensorSpec]
) -> tuple[dict[str, np.ndarray], str]:
    """The batched inputs of a TensorFlow Serving REST predict request.

    Args:
      body: the request's JSON: `{"instances": [...]}` (row form: per
        example, the value of the only input or an object of input name ->
        value) or `{"inputs": ...}` (columnar form: the only input's batched
        tensor or an object of input name -> batched tensor), and optionally
        `"signature_name": "serving_default"`. Float values may be `NaN`,
        `Infinity`, `-Infinity`, bare or as strings; string values may be
        `{"b64": "<base64>"}`.
      inputs: the model's inputs: name -> (dtype, shape without the batch).

    Returns:
      (input name -> array of its spec's dtype, the batch first; strings as
      object arrays of bytes) and the form, one of `FORMS`.

    Raises:
      TensorError: the body is not such a request, names an unknown input or
        misses one, holds ragged lists, or holds values the input's dtype
        cannot take.
    """
    try:
        request = json.loads(body)
    except RecursionError:
        raise TensorError("expected a JSON request body, received one nested too deeply") from None
    except ValueError as e:
        raise TensorError(f"expected a JSON request body, received invalid JSON: {e}") from None
    if not isinstance(request, dict):
        raise TensorError(
            f"expected a JSON object as the request body, received {_describe(request)}"
        )
    signature = request.get("signature_name", SIGNATURE_NAME)
    if signature != SIGNATURE_NAME:
        raise TensorError(
            f"expected signature_name {SIGNATURE_NAME!r}, received {_describe(signature)}"
        )
    keys = [key for key in ("instances", "inputs") if key in request]
    if len(keys) != 1:
        received = "both" if keys else "neither"
        raise TensorError(
            "expected exactly one of 'instances' (row form) and 'inputs' (columnar form), "
            f"received {received}"
        )
    names = list(inputs)
    if keys == ["instances"]:
        form, columns = "row", _row_columns(request["instances"], inputs)
    elif _is_named(request["inputs"]):
        form, columns = "columnar", request["inputs"]
        _check_names(columns, inputs, "'inputs'")
    elif len(names) == 1:
        form, columns = "columnar", {names[0]: request["inputs"]}
    else:
        raise TensorError(
            f"expected 'inputs' to be an object with the inputs {names}, "
            f"received {_describe(request['inputs'])}"
        )
    arrays = {name: _to_array(name, columns[name], inputs[name][0]) for name in names}
    return arrays, form


def _to_json(name: str, array: np.ndarray) -> Any:
    """An output array as nested lists of JSON values."""
    array = np.asarray(array)
    if array.dtype == _BFLOAT16:
        array = array.astype(np.float32)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        values = array.astype(object)
        values[np.isnan(array)] = "NaN"
        values[array == np.inf] = "Infinity"
        values[array == -np.inf] = "-Infinity"
        return values.tolist()
    if array.dtype.kind in "biufU":
        return array.tolist()
    if array.dtype.kind in "OS":
        encoded = np.frompyfunc(lambda item: _string_to_json(name, item), 1, 1)(array)
        return encoded.tolist() if isinstance(encoded, np.ndarray) else encoded
    raise ValueError(
        f"output {name!r}: expected a bool, int, float or string array, "
        f"received dtype {array.dtype}"
    )


def _string_to_json(name: str, item: Any) -> Any:
    if isinstance(item, bytes):
        return {"b64": base64.b64encode(item).decode("ascii")}
    if isinstance(item, str):
        return item
    raise ValueError(f"output {name!r}: expected str or bytes items, received {item!r:.60}")


def rest_predict_response(outputs: Mapping[str, np.ndarray], form: str) -> bytes:
    """The JSON answer to a REST predict request of form `form`.

    Row form: `{"predictions": [...]}`, per example the only output's value
    or an object of output name -> value. Columnar form: `{"outputs": ...}`,
    the only output's tensor or an object of output name -> tensor. NaN and
    infinities are the strings "NaN", "Infinity", "-Infinity" (the body
    stays strict JSON); bytes are `{"b64": "<base64>"}`.

    Raises:
      ValueError: `form` is not one of `FORMS`, there are no outputs, an
        output has no JSON encoding, or (row form) the outputs do not share
        a batch axis.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}. Received: form={form!r}")
    if not outputs:
        raise ValueError("outputs must name at least one array. Received: {}")
    if form == "row":
        shapes = {name: np.shape(array) for name, array in outputs.items()}
        if not all(shapes.values()) or len({shape[0] for shape in shapes.values()}) > 1:
            raise ValueError(f"row-form outputs must share a batch axis. Received shapes: {shapes}")
    values = {name: _to_json(name, array) for name, array in outputs.items()}
    if len(values) == 1:
        answer = next(iter(values.values()))
    elif form == "row":
        answer = [dict(zip(values, row)) for row in zip(*values.values())]
    else:
        answer = values
    answer = {"predictions" if form == "row" else "outputs": answer}
    return json.dumps(answer, allow_nan=False).encode("utf-8")


def rest_error(message: str) -> bytes:
    """The JSON body of a REST error: `{"error": message}`."""
    return json.dumps({"error": message}).encode("utf-8")
