"""The dispatcher package's boundaries: its import graph, and what importing it loads."""

import ast
import os
import pkgutil

from absl.testing import absltest

from tests import testutil

_PACKAGE = "tfscale.data.dispatcher"
_DIR = os.path.join(testutil.REPO_ROOT, *_PACKAGE.split("."))
_GENERATED = ("dispatcher_pb2", "dispatcher_pb2_grpc")


def _modules():
    found = pkgutil.iter_modules([_DIR])
    return sorted(m.name for m in found if m.name not in _GENERATED and m.name != "__main__")


def _imports(module):
    """Every name `module` imports (at any depth of its code), as `package.module.name`."""
    with open(os.path.join(_DIR, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _siblings(module):
    """The modules of the dispatcher package that `module` imports."""
    prefix = _PACKAGE + "."
    found = {n[len(prefix) :].split(".")[0] for n in _imports(module) if n.startswith(prefix)}
    return found & set(_modules()) - {module}


class ImportGraphTest(absltest.TestCase):
    def test_types_imports_nothing_of_the_dispatcher(self):
        self.assertEqual(_siblings("types"), set())

    def test_the_client_does_not_import_the_server(self):
        self.assertNotIn("server", _siblings("client"))

    def test_no_cycles(self):
        graph = {m: _siblings(m) for m in _modules()}
        done, path = set(), []

        def visit(module):
            if module in path:
                self.fail(f"Import cycle: {' -> '.join(path[path.index(module):] + [module])}")
            if module in done:
                return
            path.append(module)
            for imported in sorted(graph[module]):
                visit(imported)
            path.pop()
            done.add(module)

        for module in graph:
            visit(module)

    def test_no_higher_layer_is_imported(self):
        for module in _modules():
            higher = {
                n
                for n in _imports(module)
                if n.startswith("tfscale.")
                and not n.startswith(
                    ("tfscale.data.dispatcher", "tfscale.data.records", "tfscale.cli")
                )
            }
            self.assertEqual(higher, set(), module)


class TensorFlowFreeTest(absltest.TestCase):
    def test_importing_every_module_loads_no_tensorflow(self):
        imports = "; ".join(f"import {_PACKAGE}.{m}" for m in _modules())
        code = f"import sys; {imports}; print('tensorflow' in sys.modules)"
        result = testutil.run_python("-c", code)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(result.stdout.strip(), "False")


if __name__ == "__main__":
    absltest.main()
