"""pytest glue for absltest test files: absl flags must count as parsed."""

from absl import flags


def pytest_configure(config):
    del config  # unused
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
