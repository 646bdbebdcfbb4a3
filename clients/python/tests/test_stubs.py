"""The committed stubs are what scripts/gen_python_stubs.sh makes of proto/tome/v1/tome.proto
today, and the package's requirements admit the runtime they check for at import."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "clients/python"
COMMITTED = PACKAGE / "src/tome_client/_proto/tome/v1"
GENERATED = ["tome_pb2.py", "tome_pb2.pyi", "tome_pb2_grpc.py"]


class GeneratedStubs(unittest.TestCase):
    def test_committed_stubs_equal_a_fresh_generation(self) -> None:
        with tempfile.TemporaryDirectory() as out:
            env = dict(os.environ, PYTHON=sys.executable)
            run = subprocess.run(["bash", str(REPO / "scripts/gen_python_stubs.sh"), out], cwd=REPO, env=env, capture_output=True, text=True)
            self.assertEqual(run.returncode, 0, run.stderr)
            fresh = Path(out) / "tome/v1"
            self.assertEqual(sorted(p.name for p in fresh.iterdir()), sorted(GENERATED))
            for name in GENERATED:
                want, have = (fresh / name).read_text(), (COMMITTED / name).read_text()
                if want != have:
                    diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True), "committed", "generated"))[:12])
                    self.fail(f"{name} differs from what proto/tome/v1/tome.proto generates: run scripts/gen_python_stubs.sh and commit the result\n{diff}")

    def test_stubs_import_as_a_subpackage_only(self) -> None:
        for name in GENERATED:
            text = (COMMITTED / name).read_text()
            self.assertIsNone(re.search(r"^\s*(from|import) tome\.v1\b", text, re.M), f"{name} imports a top-level tome.v1")
        import tome_client

        self.assertEqual(tome_client.pb.ProcessEvent.__module__, "tome_client._proto.tome.v1.tome_pb2")
        self.assertEqual(tome_client.pb.DESCRIPTOR.name, "tome/v1/tome.proto", "the descriptor keeps the proto's own path (reflection finds it there)")
        self.assertEqual(tome_client.pb_grpc.TomeStub.__module__, "tome_client._proto.tome.v1.tome_pb2_grpc")

    def test_requirements_floor_at_the_versions_the_stubs_check_for(self) -> None:
        pb2 = (COMMITTED / "tome_pb2.py").read_text()
        grpc_stubs = (COMMITTED / "tome_pb2_grpc.py").read_text()
        pyproject = (PACKAGE / "pyproject.toml").read_text()
        gencode = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)$", pb2, re.M)
        grpc_generated = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'$", grpc_stubs, re.M)
        assert gencode is not None and grpc_generated is not None
        major = int(gencode.group(1))
        self.assertIn(f'"protobuf>={".".join(gencode.groups())},<{major + 1}"', pyproject, "protobuf: at least the gencode's version, same major")
        self.assertIn(f'"grpcio>={grpc_generated.group(1)},<2"', pyproject, "grpcio: at least the grpcio-tools that generated the stubs")
        script = (REPO / "scripts/gen_python_stubs.sh").read_text()
        self.assertIn(f'GRPCIO_TOOLS_PIN="grpcio-tools=={grpc_generated.group(1)}"', script)
        # And the runtime installed beside the client passes the stubs' own checks.
        from importlib.metadata import version

        installed = tuple(int(x) for x in version("protobuf").split(".")[:3])
        self.assertGreaterEqual(installed, tuple(int(x) for x in gencode.groups()))
        self.assertLess(installed[0], major + 1)


if __name__ == "__main__":
    unittest.main()
