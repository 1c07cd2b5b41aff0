"""The test suite's bookkeeping: every test file runs under bazel, long ones tagged.

`tests/conftest.py`'s `LONG` decides what the README test command skips;
bazel's `long` tag lets `bazel test --test_tag_filters=-long //...` skip the
same files (a file with any long test is tagged whole).
"""

import os
import re

from absl.testing import absltest

from tests import conftest

_TESTS = os.path.dirname(os.path.realpath(__file__))


def _py_tests() -> dict[str, str]:
    """py_test name -> its rule's text, from tests/BUILD."""
    with open(os.path.join(_TESTS, "BUILD"), encoding="utf-8") as f:
        build = f.read()
    rules = re.findall(r"py_test\(\n(.*?)\n\)", build, flags=re.S)
    return {re.search(r'name = "([^"]+)"', rule).group(1): rule for rule in rules}


class SuiteTest(absltest.TestCase):
    def test_every_test_file_has_a_py_test(self):
        files = sorted(f[: -len(".py")] for f in os.listdir(_TESTS) if f.endswith("_test.py"))
        self.assertGreater(len(files), 20)
        self.assertEqual(sorted(set(files) - set(_py_tests())), [])

    def test_files_with_long_tests_are_tagged_long(self):
        long_files = {entry.split("::")[0][len("tests/") : -len(".py")] for entry in conftest.LONG}
        tagged = {name for name, rule in _py_tests().items() if '"long"' in rule}
        self.assertEqual(sorted(tagged), sorted(long_files))


if __name__ == "__main__":
    absltest.main()
