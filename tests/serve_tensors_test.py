"""Tests for the TensorFlow Serving wire conversions of a serving replica."""

import base64
import json

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2

from tests import testutil
from tfscale.serve import tensors

testutil.setup_devices()

DTYPES = (np.float32, np.float16, np.int32, np.int64, np.bool_, object)
SHAPES = ((), (0,), (1,), (3,), (2, 3), (0, 4), (2, 1, 3))


def sample(dtype, shape):
    """A deterministic array of `dtype` and `shape` with distinct values."""
    values = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) - 2
    if dtype is object:
        return np.vectorize(lambda v: f"s{v}".encode(), otypes=[object])(values)
    if dtype is np.bool_:
        return values % 2 == 0
    return values.astype(dtype) * (np.array(1.5, dtype) if np.dtype(dtype).kind == "f" else 1)


def shape_proto(*dims):
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]
    )


def over_the_wire(proto):
    """`proto` as a server receives it inside a serialized PredictRequest."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(proto)
    return predict_pb2.PredictRequest.FromString(request.SerializeToString()).inputs["x"]


def assert_same(test, got, want):
    test.assertEqual(got.shape, want.shape)
    test.assertEqual(got.dtype, want.dtype)
    np.testing.assert_array_equal(got, want)


class FromTensorProtoTest(parameterized.TestCase):

    @parameterized.product(dtype=DTYPES, shape=SHAPES)
    def test_client_proto_round_trip(self, dtype, shape):
        want = sample(dtype, shape)
        got = tensors.from_tensor_proto("x", over_the_wire(tf.make_tensor_proto(want)))
        assert_same(self, got, want)

    @parameterized.product(dtype=DTYPES, shape=SHAPES)
    def test_to_tensor_proto_round_trip(self, dtype, shape):
        want = sample(dtype, shape)
        proto = tensors.to_tensor_proto(want)
        if dtype is object:
            self.assertEqual(list(proto.string_val), list(want.ravel()))
        else:
            self.assertLen(proto.tensor_content, want.nbytes)
            self.assertEqual(proto.tensor_content, want.tobytes())
        assert_same(self, tensors.from_tensor_proto("x", over_the_wire(proto)), want)

    def test_strings_are_object_arrays_of_bytes(self):
        got = tensors.from_tensor_proto("x", tf.make_tensor_proto(np.array(["ab", "é"])))
        self.assertEqual(got.dtype, object)
        self.assertEqual(got.tolist(), [b"ab", "é".encode()])

    def test_repeated_float_val(self):
        proto = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=shape_proto(2, 3), float_val=range(6)
        )
        got = tensors.from_tensor_proto("x", over_the_wire(proto))
        assert_same(self, got, np.arange(6, dtype=np.float32).reshape(2, 3))

    def test_repeated_fields_of_other_dtypes(self):
        cases = [
            (types_pb2.DT_INT32, "int_val", [1, -2], np.int32),
            (types_pb2.DT_INT64, "int64_val", [2**40, -1], np.int64),
            (types_pb2.DT_DOUBLE, "double_val", [0.25, -1.0], np.float64),
            (types_pb2.DT_BOOL, "bool_val", [True, False], np.bool_),
            (types_pb2.DT_STRING, "string_val", [b"a", b""], object),
        ]
        for dtype, field, values, np_dtype in cases:
            with self.subTest(field=field):
                proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape_proto(2))
                getattr(proto, field).extend(values)
                want = np.array(values, dtype=np_dtype)
                assert_same(self, tensors.from_tensor_proto("x", over_the_wire(proto)), want)

    def test_half_val_holds_float16_bits(self):
        want = np.array([1.5, -2.0], np.float16)
        proto = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_HALF,
            tensor_shape=shape_proto(2),
            half_val=want.view(np.uint16).tolist(),
        )
        assert_same(self, tensors.from_tensor_proto("x", proto), want)

    def test_one_value_is_broadcast(self):
        proto = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=shape_proto(2, 3), float_val=[7.0]
        )
        assert_same(self, tensors.from_tensor_proto("x", proto), np.full((2, 3), 7, np.float32))
        strings = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, tensor_shape=shape_proto(3), string_val=[b"z"]
        )
        self.assertEqual(tensors.from_tensor_proto("x", strings).tolist(), [b"z"] * 3)

    def test_wrong_content_length(self):
        proto = tf.make_tensor_proto(np.zeros((2, 3), np.float32))
        proto.tensor_content = proto.tensor_content[:-4]
        with self.assertRaisesRegex(
            tensors.TensorError,
            r"input 'x': expected 24 bytes of tensor_content for shape \[2, 3\] of float32, "
            r"received 20",
        ):
            tensors.from_tensor_proto("x", proto)

    def test_content_longer_than_shape(self):
        proto = tf.make_tensor_proto(np.zeros((2, 3), np.int64))
        proto.tensor_shape.dim[0].size = 1
        with self.assertRaisesRegex(tensors.TensorError, r"expected 24 bytes .* received 48"):
            tensors.from_tensor_proto("x", proto)

    def test_wrong_value_count(self):
        proto = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=shape_proto(2, 3), float_val=[1.0, 2.0]
        )
        with self.assertRaisesRegex(
            tensors.TensorError,
            r"input 'x': expected 1 or 6 values in float_val for shape \[2, 3\] of float32, "
            r"received 2",
        ):
            tensors.from_tensor_proto("x", proto)

    def test_too_many_values(self):
        proto = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, tensor_shape=shape_proto(2), string_val=[b"a"] * 3
        )
        with self.assertRaisesRegex(tensors.TensorError, r"expected 1 or 2 values in string_val"):
            tensors.from_tensor_proto("x", proto)

    def test_no_values(self):
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, tensor_shape=shape_proto(4))
        with self.assertRaisesRegex(tensors.TensorError, r"expected 1 or 4 values .* received 0"):
            tensors.from_tensor_proto("x", proto)

    def test_one_value_for_an_empty_shape(self):
        proto = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=shape_proto(0, 3), float_val=[1.0]
        )
        with self.assertRaisesRegex(
            tensors.TensorError, r"expected 0 values in float_val .* received 1"
        ):
            tensors.from_tensor_proto("x", proto)

    @parameterized.parameters(
        (types_pb2.DT_RESOURCE, "DT_RESOURCE"),
        (types_pb2.DT_VARIANT, "DT_VARIANT"),
        (types_pb2.DT_INVALID, "DT_INVALID"),
        (types_pb2.DT_FLOAT_REF, "DT_FLOAT_REF"),
        (types_pb2.DT_QINT8, "DT_QINT8"),
        (999, "the unknown dtype number 999"),
    )
    def test_unsupported_dtype(self, dtype, name):
        proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape_proto(1))
        with self.assertRaisesRegex(
            tensors.TensorError,
            rf"input 'x': expected a tensor of one of .*DT_FLOAT.*, received {name}$",
        ):
            tensors.from_tensor_proto("x", proto)

    def test_negative_dimension(self):
        proto = tf.make_tensor_proto(np.zeros((2, 3), np.float32))
        proto.tensor_shape.dim[0].size = -1
        with self.assertRaisesRegex(
            tensors.TensorError, r"input 'x': expected dimensions >= 0, received shape \[-1, 3\]"
        ):
            tensors.from_tensor_proto("x", proto)

    def test_unknown_rank(self):
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
        proto.tensor_shape.unknown_rank = True
        with self.assertRaisesRegex(
            tensors.TensorError, r"input 'x': expected a known rank, received unknown_rank"
        ):
            tensors.from_tensor_proto("x", proto)

    def test_huge_shape(self):
        proto = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=shape_proto(1 << 40, 1 << 40), float_val=[1.0]
        )
        with self.assertRaisesRegex(
            tensors.TensorError,
            rf"input 'x': expected at most {1 << 28} elements, received shape "
            rf"\[{1 << 40}, {1 << 40}\] \({1 << 80} elements\)",
        ):
            tensors.from_tensor_proto("x", proto)

    def test_max_elements(self):
        proto = tf.make_tensor_proto(np.zeros((2, 3), np.float32))
        self.assertEqual(tensors.from_tensor_proto("x", proto, max_elements=6).shape, (2, 3))
        with self.assertRaisesRegex(tensors.TensorError, r"expected at most 5 elements"):
            tensors.from_tensor_proto("x", proto, max_elements=5)

    def test_string_in_tensor_content(self):
        proto = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, tensor_shape=shape_proto(1), tensor_content=b"abcd"
        )
        with self.assertRaisesRegex(tensors.TensorError, r"received tensor_content"):
            tensors.from_tensor_proto("x", proto)

    def test_values_out_of_range_for_the_dtype(self):
        half = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_HALF, tensor_shape=shape_proto(1), half_val=[70000]
        )
        int8 = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_INT8, tensor_shape=shape_proto(1), int_val=[300]
        )
        for proto in (half, int8):
            with self.assertRaisesRegex(tensors.TensorError, r"input 'x': expected a valid tensor"):
                tensors.from_tensor_proto("x", proto)

    def test_error_is_a_value_error(self):
        self.assertTrue(issubclass(tensors.TensorError, ValueError))

    def test_to_tensor_proto_rejects_other_dtypes(self):
        with self.assertRaisesRegex(ValueError, r"received dtype datetime64"):
            tensors.to_tensor_proto(np.array(["2020-01-01"], dtype="datetime64[D]"))
        with self.assertRaisesRegex(ValueError, r"expected an array of str or bytes"):
            tensors.to_tensor_proto(np.array([{}], dtype=object))


F32 = (np.dtype(np.float32), (3,))
# The model of TensorFlow Serving's REST docs (api_rest.md, "row format").
DOCS_INPUTS = {
    "tag": (np.dtype(object), ()),
    "signal": (np.dtype(np.int32), (5,)),
    "sensor": (np.dtype(np.float32), (2, 2)),
}
DOCS_ROWS = {
    "instances": [
        {"tag": "foo", "signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
        {"tag": "bar", "signal": [3, 4, 1, 2, 5], "sensor": [[4, 5], [6, 8]]},
    ]
}
DOCS_COLUMNS = {
    "inputs": {
        "tag": ["foo", "bar"],
        "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]],
        "sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]],
    }
}


def parse(request, inputs=None):
    body = request if isinstance(request, (str, bytes)) else json.dumps(request)
    return tensors.parse_rest_predict(body, inputs or {"x": F32})


class ParseRestPredictTest(parameterized.TestCase):

    def test_row_single_input(self):
        arrays, form = parse({"instances": [[1, 2, 3], [4.5, 5, 6]]})
        self.assertEqual(form, "row")
        assert_same(self, arrays["x"], np.array([[1, 2, 3], [4.5, 5, 6]], np.float32))

    def test_row_single_input_named(self):
        arrays, form = parse({"instances": [{"x": [1, 2, 3]}, [4, 5, 6]]})
        self.assertEqual(form, "row")
        assert_same(self, arrays["x"], np.array([[1, 2, 3], [4, 5, 6]], np.float32))

    def test_docs_example_row_and_columnar_agree(self):
        rows, row_form = parse(DOCS_ROWS, DOCS_INPUTS)
        columns, columnar_form = parse(DOCS_COLUMNS, DOCS_INPUTS)
        self.assertEqual((row_form, columnar_form), ("row", "columnar"))
        self.assertEqual(rows["tag"].tolist(), [b"foo", b"bar"])
        assert_same(self, rows["signal"], np.array([[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]], np.int32))
        assert_same(
            self, rows["sensor"], np.array([[[1, 2], [3, 4]], [[4, 5], [6, 8]]], np.float32)
        )
        for name in DOCS_INPUTS:
            assert_same(self, columns[name], rows[name])

    def test_columnar_single_tensor(self):
        arrays, form = parse('{"inputs": [[1, 2, 3]], "signature_name": "serving_default"}')
        self.assertEqual(form, "columnar")
        assert_same(self, arrays["x"], np.array([[1, 2, 3]], np.float32))

    def test_columnar_single_named(self):
        arrays, _ = parse(b'{"inputs": {"x": [[1, 2, 3], [4, 5, 6]]}}')
        assert_same(self, arrays["x"], np.arange(1, 7, dtype=np.float32).reshape(2, 3))

    def test_columnar_empty_batch(self):
        arrays, _ = parse({"inputs": {"x": []}})
        assert_same(self, arrays["x"], np.zeros((0,), np.float32))

    def test_b64_and_utf8_strings(self):
        inputs = {"image": (np.dtype(object), ())}
        data = bytes(range(256))
        request = {"instances": [{"b64": base64.b64encode(data).decode()}, "é", {"image": "z"}]}
        arrays, _ = parse(request, inputs)
        self.assertEqual(arrays["image"].dtype, object)
        self.assertEqual(arrays["image"].tolist(), [data, "é".encode(), b"z"])
        columns, _ = parse({"inputs": {"image": [{"b64": "YQ=="}]}}, inputs)
        self.assertEqual(columns["image"].tolist(), [b"a"])

    def test_special_floats(self):
        arrays, _ = parse('{"instances": [[NaN, Infinity, -Infinity], ["NaN", "Infinity", 1]]}')
        got = arrays["x"]
        self.assertTrue(np.isnan(got[:, 0]).all())
        np.testing.assert_array_equal(got[:, 1], [np.inf, np.inf])
        np.testing.assert_array_equal(got[1:, 2], [1.0])

    @parameterized.parameters(
        (np.bool_, [True, False], [True, False]),
        (np.int8, [-128, 127], [-128, 127]),
        (np.int64, [2**62, -(2**62)], [2**62, -(2**62)]),
        (np.uint64, [2**64 - 1], [2**64 - 1]),
        (np.float64, [1e300, 3], [1e300, 3.0]),
        (np.float16, [0.5, 2], [0.5, 2.0]),
        (tf.bfloat16.as_numpy_dtype, [0.5, 2], [0.5, 2.0]),
    )
    def test_dtypes(self, dtype, values, want):
        arrays, _ = parse({"instances": values}, {"x": (np.dtype(dtype), ())})
        assert_same(self, arrays["x"], np.array(want, dtype=dtype))

    def test_scalar_inputs_of_several_examples(self):
        inputs = {"a": (np.dtype(np.int32), ()), "b": (np.dtype(np.bool_), ())}
        arrays, _ = parse({"instances": [{"a": 1, "b": True}, {"b": False, "a": 2}]}, inputs)
        assert_same(self, arrays["a"], np.array([1, 2], np.int32))
        assert_same(self, arrays["b"], np.array([True, False]))

    @parameterized.named_parameters(
        (
            "invalid_json",
            b'{"instances": [1,',
            r"^expected a JSON request body, received invalid JSON",
        ),
        ("invalid_utf8", b'{"instances": ["\xff"]}', r"received invalid JSON"),
        ("deep", "[" * 100000 + "]" * 100000, r"nested too deeply"),
        ("not_an_object", "[[1, 2, 3]]", r"^expected a JSON object .* received a list of 1 items$"),
        ("both", {"instances": [], "inputs": []}, r"exactly one of 'instances' .* received both$"),
        ("neither", {"instance": [[1, 2, 3]]}, r"received neither$"),
        (
            "signature",
            {"signature_name": "predict", "instances": [[1, 2, 3]]},
            r"^expected signature_name 'serving_default', received the string 'predict'$",
        ),
        ("empty", {"instances": []}, r"^expected at least one example in 'instances'"),
        ("not_a_list", {"instances": {"x": [1, 2, 3]}}, r"expected 'instances' to be a list"),
        (
            "unknown_row",
            {"instances": [{"x": [1, 2, 3], "y": 1}]},
            r"^instance 0: unknown input 'y'; the model's inputs are \['x'\]$",
        ),
        (
            "unknown_columnar",
            {"inputs": {"z": [[1, 2, 3]]}},
            r"^'inputs': unknown input 'z'; the model's inputs are \['x'\]$",
        ),
        ("missing_columnar", {"inputs": {}}, r"^'inputs': missing input 'x'"),
        (
            "ragged_rows",
            {"instances": [[1, 2, 3], [4, 5]]},
            r"^input 'x': ragged values: expected lists of one length at depth 1, "
            r"received lengths \[2, 3\]$",
        ),
        (
            "ragged_depth",
            {"inputs": [[1, 2, 3], 4]},
            r"^input 'x': ragged values: expected only lists or only values at depth 1",
        ),
        (
            "string_for_float",
            {"instances": [[1, 2, "abc"]]},
            r"^input 'x': expected float32 values, received the string 'abc'$",
        ),
        (
            "bool_for_float",
            {"inputs": [[1, True, 3]]},
            r"^input 'x': expected float32 values, received the boolean true$",
        ),
        (
            "null_for_float",
            {"inputs": [[1, None, 3]]},
            r"^input 'x': expected float32 values, received null$",
        ),
        (
            "float_overflow",
            {"inputs": [[1, 2, 1e300]]},
            r"^input 'x': expected float32 values, received the number 1e\+300 \(out of range\)$",
        ),
        (
            "int_overflow",
            {"inputs": [[1, 2, 10**400]]},
            r"^input 'x': expected float32 values, received the number 1000.* \(out of range\)$",
        ),
    )
    def test_errors(self, request, message):
        with self.assertRaisesRegex(tensors.TensorError, message):
            parse(request)

    @parameterized.named_parameters(
        ("missing_row", {"instances": [{"a": 1}]}, r"^instance 0: missing input 'b'; "),
        (
            "bare_instance",
            {"instances": [{"a": 1, "b": True}, 3]},
            r"^instance 1: expected an object with the inputs \['a', 'b'\], received the number 3$",
        ),
        (
            "columnar_tensor",
            {"inputs": [1, 2]},
            r"^expected 'inputs' to be an object with the inputs \['a', 'b'\], received a list",
        ),
        (
            "float_for_int",
            {"instances": [{"a": 1.5, "b": True}]},
            r"^input 'a': expected int8 values, received the number 1.5$",
        ),
        (
            "int_out_of_range",
            {"inputs": {"a": [1, 300], "b": [True, True]}},
            r"^input 'a': expected int8 values, received the number 300 \(out of range\)$",
        ),
        (
            "int_for_bool",
            {"inputs": {"a": [1], "b": [1]}},
            r"^input 'b': expected bool values, received the number 1$",
        ),
    )
    def test_errors_of_several_inputs(self, request, message):
        inputs = {"a": (np.dtype(np.int8), ()), "b": (np.dtype(np.bool_), ())}
        with self.assertRaisesRegex(tensors.TensorError, message):
            parse(request, inputs)

    @parameterized.named_parameters(
        (
            "number",
            {"instances": [3]},
            r"^input 's': expected string values .* received the number 3$",
        ),
        ("bad_b64", {"instances": [{"b64": "a!=="}]}, r"^input 's': expected base64 in 'b64'"),
        (
            "b64_not_a_string",
            {"instances": [{"b64": 1}]},
            r"received an object with keys \['b64'\]",
        ),
    )
    def test_string_errors(self, request, message):
        with self.assertRaisesRegex(tensors.TensorError, message):
            parse(request, {"s": (np.dtype(object), ())})


def strict_json(body):
    """`body` parsed by a parser that refuses NaN and Infinity, as RFC 8259 does."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(body, parse_constant=refuse)


class RestPredictResponseTest(absltest.TestCase):

    def test_docs_example(self):
        # api_rest.md: {"instances": [1.0,2.0,5.0]} to half_plus_three.
        arrays, form = parse('{"instances": [1.0,2.0,5.0]}', {"x": (np.dtype(np.float32), ())})
        body = tensors.rest_predict_response({"y": arrays["x"] * 0.5 + 3}, form)
        self.assertEqual(body, b'{"predictions": [3.5, 4.0, 5.5]}')

    def test_row_several_outputs(self):
        outputs = {"label": np.array([1, 0], np.int64), "ok": np.array([[True], [False]])}
        body = strict_json(tensors.rest_predict_response(outputs, "row"))
        self.assertEqual(
            body, {"predictions": [{"label": 1, "ok": [True]}, {"label": 0, "ok": [False]}]}
        )

    def test_columnar(self):
        one = tensors.rest_predict_response({"y": np.array([[1.5, 2]], np.float32)}, "columnar")
        self.assertEqual(strict_json(one), {"outputs": [[1.5, 2.0]]})
        scalar = tensors.rest_predict_response({"y": np.array(7, np.int32)}, "columnar")
        self.assertEqual(strict_json(scalar), {"outputs": 7})
        outputs = {"a": np.zeros((0, 2), np.float32), "b": np.array([1, 2, 3], np.int32)}
        several = tensors.rest_predict_response(outputs, "columnar")
        self.assertEqual(strict_json(several), {"outputs": {"a": [], "b": [1, 2, 3]}})

    def test_non_finite_floats_are_strings(self):
        for dtype in (np.float16, np.float32, np.float64, tf.bfloat16.as_numpy_dtype):
            with self.subTest(dtype=dtype):
                y = np.array([[np.nan, np.inf], [-np.inf, 0.5]], dtype)
                body = strict_json(tensors.rest_predict_response({"y": y}, "row"))
                self.assertEqual(body, {"predictions": [["NaN", "Infinity"], ["-Infinity", 0.5]]})

    def test_bytes_are_b64_and_str_is_text(self):
        outputs = {"raw": np.array([b"\x00\xff", b""], object), "text": np.array(["é", "b"])}
        body = strict_json(tensors.rest_predict_response(outputs, "row"))
        self.assertEqual(
            body,
            {
                "predictions": [
                    {"raw": {"b64": "AP8="}, "text": "é"},
                    {"raw": {"b64": ""}, "text": "b"},
                ]
            },
        )
        scalar = tensors.rest_predict_response({"raw": np.array(b"a", object)}, "columnar")
        self.assertEqual(strict_json(scalar), {"outputs": {"b64": "YQ=="}})

    def test_b64_round_trip(self):
        inputs = {"s": (np.dtype(object), ())}
        data = bytes(range(200))
        arrays, form = parse({"inputs": [{"b64": base64.b64encode(data).decode()}]}, inputs)
        body = strict_json(tensors.rest_predict_response(arrays, form))
        self.assertEqual(base64.b64decode(body["outputs"][0]["b64"]), data)

    def test_bad_outputs(self):
        with self.assertRaisesRegex(ValueError, r"form must be one of \('row', 'columnar'\)"):
            tensors.rest_predict_response({"y": np.zeros(2)}, "rows")
        with self.assertRaisesRegex(ValueError, r"at least one array"):
            tensors.rest_predict_response({}, "row")
        with self.assertRaisesRegex(ValueError, r"must share a batch axis"):
            tensors.rest_predict_response({"y": np.zeros(2), "z": np.zeros(3)}, "row")
        with self.assertRaisesRegex(ValueError, r"must share a batch axis"):
            tensors.rest_predict_response({"y": np.float32(1)}, "row")
        with self.assertRaisesRegex(ValueError, r"output 'y': .* received dtype complex64"):
            tensors.rest_predict_response({"y": np.zeros(2, np.complex64)}, "row")
        with self.assertRaisesRegex(ValueError, r"output 'y': expected str or bytes items"):
            tensors.rest_predict_response({"y": np.array([1, None], object)}, "row")

    def test_rest_error(self):
        body = tensors.rest_error("input 'x': expected float32 values, received \"a\"")
        self.assertEqual(
            strict_json(body), {"error": "input 'x': expected float32 values, received \"a\""}
        )


if __name__ == "__main__":
    absltest.main()
