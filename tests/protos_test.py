"""The checked-in protocol modules match dispatcher.proto (tools/gen_protos.sh)."""

import os

from absl.testing import absltest
from grpc_tools import protoc

from tests import testutil

PROTO = "tfscale/data/dispatcher/dispatcher.proto"
GENERATED = ("dispatcher_pb2.py", "dispatcher_pb2_grpc.py")


class GeneratedProtosTest(absltest.TestCase):
    def test_generated_modules_are_fresh(self):
        out = self.create_tempdir().full_path
        well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        status = protoc.main(
            ["protoc", f"--proto_path={testutil.REPO_ROOT}", f"--proto_path={well_known}",
             f"--python_out={out}", f"--grpc_python_out={out}", os.path.join(testutil.REPO_ROOT, PROTO)]
        )
        self.assertEqual(status, 0)
        for name in GENERATED:
            with open(os.path.join(out, os.path.dirname(PROTO), name)) as f:
                fresh = f.read()
            with open(os.path.join(testutil.REPO_ROOT, os.path.dirname(PROTO), name)) as f:
                checked_in = f.read()
            self.assertEqual(
                checked_in, fresh, f"{name} is stale: run `bash tools/gen_protos.sh` and commit"
            )


if __name__ == "__main__":
    absltest.main()
