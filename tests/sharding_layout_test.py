"""Mesh specs and layout maps: parsing, matching, presets, and their errors."""

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402

import tfscale  # noqa: E402
from tfscale.sharding import mesh as mesh_lib  # noqa: E402


class MeshSpecTest(parameterized.TestCase):
    def test_parse(self):
        spec = mesh_lib.MeshSpec.parse(" batch = 2 , model=2")
        self.assertEqual(spec.axes, (("batch", 2), ("model", 2)))
        self.assertEqual(spec.size, 4)
        self.assertEqual(spec.axis_size("model"), 2)
        self.assertEqual(spec.axis_size("absent"), 1)
        self.assertEqual(str(spec), "batch=2,model=2")
        self.assertIs(mesh_lib.MeshSpec.parse(spec), spec)

    @parameterized.parameters(
        ("", "a string like"),
        ("batch", r"NAME=SIZE.*'batch'"),
        ("batch=two", r"NAME=SIZE.*'batch=two'"),
        ("batch=-1", r"NAME=SIZE.*'batch=-1'"),
        ("batch=0", r"positive ints.*batch=0"),
        ("batch=2,batch=2", r"unique.*\['batch'\]"),
        ("2d=2", r"identifiers.*'2d'"),
    )
    def test_bad_specs(self, spec, message):
        with self.assertRaisesRegex(ValueError, message):
            mesh_lib.MeshSpec.parse(spec)

    def test_mesh_over_the_local_devices(self):
        mesh = mesh_lib.build_mesh("batch=2,model=2")
        self.assertEqual(list(mesh.dim_names), ["batch", "model"])
        self.assertEqual(mesh.size, 4)
        with self.assertRaisesRegex(ValueError, r"mesh model=2 needs 2 devices, found 4"):
            mesh_lib.build_mesh("model=2")
        self.assertEqual(mesh_lib.build_mesh("model=2", devices=["CPU:0", "CPU:1"]).size, 2)


class LayoutMapTest(parameterized.TestCase):
    def test_first_matching_rule_wins_and_unmatched_is_none(self):
        layout_map = tfscale.LayoutMap(
            [(r"up/kernel$", (None, "model")), (r"kernel$", ("model", None))]
        )
        self.assertEqual(layout_map.axes_for("block0_mlp_up/kernel", (4, 8)), (None, "model"))
        self.assertEqual(layout_map.axes_for("head/kernel", (4, 8)), ("model", None))
        self.assertIsNone(layout_map.axes_for("head/bias", (8,)))
        self.assertEqual(layout_map.mesh_axes, {"model"})
        self.assertLen(layout_map, 2)
        self.assertIn("up/kernel$", repr(layout_map))

    def test_rank_mismatch_names_variable_rule_and_shapes(self):
        layout_map = tfscale.LayoutMap({r"kernel": (None, None, "model")})
        with self.assertRaisesRegex(
            ValueError,
            r"rule 'kernel' gives 3 dimension\(s\).*'dense/kernel' has shape \(4, 8\) \(rank 2\)",
        ):
            layout_map.axes_for("dense/kernel", (4, 8))

    @parameterized.parameters(
        ({r"(": (None,)}, "not a valid regular expression"),
        ({r"x": "model"}, "axes must be a tuple"),
        ({r"x": (1,)}, "axes must be a tuple"),
        ([("x",)], r"\(pattern, axes\) pairs"),
        (42, "A layout map is"),
    )
    def test_bad_rules(self, rules, message):
        with self.assertRaisesRegex(ValueError, message):
            tfscale.LayoutMap(rules)

    def test_from_keras_layout_map_matches_whole_paths(self):
        keras_map = keras.distribution.LayoutMap(None)
        keras_map["dense/kernel"] = (None, "model")
        keras_map["d.*/bias"] = ("model",)
        layout_map = tfscale.LayoutMap(keras_map)
        self.assertEqual(layout_map.axes_for("dense/kernel", (2, 2)), (None, "model"))
        self.assertIsNone(layout_map.axes_for("outer/dense/kernel", (2, 2)))
        self.assertEqual(layout_map.axes_for("dense/bias", (2,)), ("model",))

    def test_presets(self):
        self.assertLen(tfscale.LayoutMap.preset("data_parallel"), 0)
        megatron = tfscale.LayoutMap.preset("megatron")
        expected = {
            "block0_attention/query/kernel": ((64, 4, 16), (None, "model", None)),
            "block0_attention/value/bias": ((4, 16), ("model", None)),
            "block0_attention/attention_output/kernel": ((4, 16, 64), ("model", None, None)),
            "block0_attention/attention_output/bias": ((64,), None),
            "block0_mlp_up/kernel": ((64, 128), (None, "model")),
            "block0_mlp_up/bias": ((128,), ("model",)),
            "block0_mlp_down/kernel": ((128, 64), ("model", None)),
            "block0_mlp_down/bias": ((64,), None),
            "fc1/kernel": ((784, 50), (None, "model")),
            "fc2/kernel": ((50, 10), ("model", None)),
            "token_embedding/embeddings": ((1000, 64), (None, "model")),
            "head/kernel": ((64, 10), None),
            "block0_norm1/gamma": ((64,), None),
        }
        for path, (shape, axes) in expected.items():
            self.assertEqual(megatron.axes_for(path, shape), axes, path)
        vocab = tfscale.LayoutMap.preset("megatron", embedding="vocab", model_axis="mp")
        self.assertEqual(vocab.axes_for("token_embedding/embeddings", (1000, 64)), ("mp", None))
        self.assertEqual(vocab.mesh_axes, {"mp"})

    def test_bad_presets(self):
        with self.assertRaisesRegex(
            ValueError, r"Unknown layout preset 'zero'.*data_parallel, megatron"
        ):
            tfscale.LayoutMap.preset("zero")
        with self.assertRaisesRegex(ValueError, r"embedding must be one of.*'rows'"):
            tfscale.LayoutMap.preset("megatron", embedding="rows")
        with self.assertRaisesRegex(ValueError, "Unknown layout preset"):
            tfscale.distribution("dtensor", mesh="batch=2,model=2", layout_map="zero")


if __name__ == "__main__":
    absltest.main()
