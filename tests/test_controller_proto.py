"""The committed generated code matches proto/adaptrun/v1/*.proto, and nothing imports
grpc_tools at run time."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENERATED = ("control_plane_pb2.py", "control_plane_pb2.pyi", "control_plane_pb2_grpc.py")


@pytest.mark.timeout(60)
def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    # The same command as in the .proto header: the mapping puts the file in the
    # adaptrun.generated package, so protoc writes `from adaptrun.generated import ...`.
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc",
                    f"-Iadaptrun/generated={ROOT / 'proto/adaptrun/v1'}",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", "adaptrun/generated/control_plane.proto"],
                   check=True, cwd=ROOT)
    for name in GENERATED:
        fresh = (tmp_path / "adaptrun" / "generated" / name).read_text()
        committed = (ROOT / "adaptrun" / "generated" / name).read_text()
        assert fresh == committed, (
            f"adaptrun/generated/{name} is stale: regenerate it with the command in "
            f"proto/adaptrun/v1/control_plane.proto")


@pytest.mark.timeout(30)
def test_no_runtime_import_of_grpc_tools():
    for folder in ("adaptrun", "controller", "agents"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "import grpc_tools" not in path.read_text(), path
            assert "from grpc_tools" not in path.read_text(), path


@pytest.mark.timeout(30)
def test_report_message_has_the_report_fields():
    from dataclasses import fields

    from adaptrun.generated import control_plane_pb2 as pb
    from adaptrun.science.report import Report

    assert [f.name for f in pb.Report.DESCRIPTOR.fields] == [f.name for f in fields(Report)]
