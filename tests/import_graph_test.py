"""The package's import graph has no cycle and no upward arrow.

Layers, lowest first; a module may import modules of its own layer entry or
of a lower layer only. Imports under `if TYPE_CHECKING:` (annotations) do
not count.
"""

import ast
import os

from absl.testing import absltest

# The source tree (under bazel, this file is a link into it from the runfiles).
_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "tfscale")

# Each entry: module prefixes of one layer. The longest matching prefix wins.
LAYERS = (
    # Leaves: import nothing of tfscale.
    (
        "tfscale.cli",
        "tfscale.compat",
        "tfscale.processes",
        "tfscale.devices",
        "tfscale.strategies.cluster",
        "tfscale.data.records",
        "tfscale.train.files",
        "tfscale.sharding.layout_map",
        "tfscale.sharding.memory",
    ),
    # The abstract distribution; the dispatcher service (TensorFlow-free).
    ("tfscale.distribution_base", "tfscale.data.dispatcher"),
    # The kinds' implementations; the input pipelines.
    ("tfscale.strategies", "tfscale.sharding", "tfscale.data"),
    # The registry of kinds; the planner, which chooses among them (and which
    # the registry's "auto" kind may import).
    ("tfscale.distributions", "tfscale.planner"),
    # Programs.
    ("tfscale.train", "tfscale.launch", "tfscale.serve"),
    # The package's lazy exports.
    ("tfscale",),
)


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(_ROOT))[: -len(".py")]
    name = relative.replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _modules() -> dict[str, str]:
    modules = {}
    for directory, _, files in os.walk(_ROOT):
        for file in files:
            if file.endswith(".py") and not file.endswith(("_pb2.py", "_pb2_grpc.py")):
                path = os.path.join(directory, file)
                modules[_module_name(path)] = path
    return modules


def _runtime_imports(tree: ast.AST) -> list[ast.AST]:
    """Import nodes, skipping `if TYPE_CHECKING:` blocks."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        found.extend(_runtime_imports(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the tfscale modules it imports when it runs."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in _runtime_imports(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str) -> tuple[int, str]:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of import_graph_test.LAYERS")
    return best


class ImportGraphTest(absltest.TestCase):
    def test_no_cycle(self):
        graph = import_graph()
        state: dict[str, int] = {}  # 1: on the current path, 2: done

        def visit(module: str, path: list[str]) -> None:
            state[module] = 1
            for target in sorted(graph[module]):
                if state.get(target) == 1:
                    cycle = path[path.index(target) :] + [module, target]
                    self.fail(f"import cycle: {' -> '.join(cycle)}")
                if target not in state:
                    visit(target, path + [module])
            state[module] = 2

        for module in sorted(graph):
            if module not in state:
                visit(module, [])

    def test_no_upward_arrow(self):
        upward = []
        for module, targets in sorted(import_graph().items()):
            layer, _ = layer_of(module)
            for target in sorted(targets):
                if layer_of(target)[0] > layer:
                    upward.append(
                        f"{module} (layer {layer}) -> {target} (layer {layer_of(target)[0]})"
                    )
        self.assertEqual(upward, [], "modules import from a higher layer")

    def test_the_graph_is_read(self):
        graph = import_graph()
        self.assertIn("tfscale.distribution_base", graph["tfscale.strategies.distribution"])
        self.assertIn("tfscale.distributions", graph["tfscale.train.lib"])
        self.assertNotIn("tfscale.sharding.memory", graph["tfscale.distribution_base"])


if __name__ == "__main__":
    absltest.main()
