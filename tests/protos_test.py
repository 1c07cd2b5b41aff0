"""The checked-in protocol modules match dispatcher.proto (tools/gen_protos.sh)."""

import os

from absl.testing import absltest

from tests import testutil

PROTO = "tfscale/data/dispatcher/dispatcher.proto"
GENERATED = ("dispatcher_pb2.py", "dispatcher_pb2_grpc.py")


class GeneratedProtosTest(absltest.TestCase):
    def test_generated_modules_are_fresh(self):
        out = self.create_tempdir().full_path
        # protoc runs in its own process: in one with gRPC servers and the
        # protobuf runtime already loaded it can crash.
        result = testutil.run_python(
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={testutil.REPO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
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
