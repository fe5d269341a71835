"""Coverage-guided fuzzing of the controller's gRPC surface with atheris (not run in CI).

Each input picks an RPC (its first byte) and is sent as that RPC's raw request bytes (the
rest) to an in-process controller on 127.0.0.1, from a registered agent of a fuzz job. A
call that ends in UNKNOWN / INTERNAL, without a message, or past its deadline is a crash.

    . .venv/bin/activate && pip install atheris
    python tests/fuzz/fuzz_grpc_atheris.py -runs=100000          # or -max_total_time=600

(libFuzzer flags after the script; a crashing input is written as crash-* in the cwd.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
with atheris.instrument_imports(include=["adaptrun", "controller_support"]):
    import grpc
    from controller_support import AGENT, register, running_controller

METHODS = ["Register", "StreamReports", "WatchDirectives", "ListJobs", "SetBounds"]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED}


def main() -> None:
    with running_controller(metrics_port=None, rdzv_port=None, report_rate_per_s=1e6,
                            report_burst=10**6) as ctl:
        ch = grpc.insecure_channel(ctl.address)
        from adaptrun.generated import control_plane_pb2_grpc as pb_grpc
        agent = register(pb_grpc.ControllerStub(ch), "fuzz-a").agent_id
        md = ((AGENT, agent),)

        def one(data: bytes) -> None:
            if not data:
                return
            name = METHODS[data[0] % len(METHODS)]
            payload, path = data[1:], f"/adaptrun.v1.Controller/{name}"
            try:
                if name == "StreamReports":
                    list(ch.stream_stream(path)(iter([payload]), metadata=md, timeout=10))
                elif name == "WatchDirectives":
                    for _ in ch.unary_stream(path)(payload, timeout=0.2):
                        pass
                else:
                    ch.unary_unary(path)(payload, timeout=10)
            except grpc.RpcError as exc:
                code = exc.code()
                if name == "WatchDirectives" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return
                if code not in ALLOWED or not exc.details():
                    raise AssertionError(f"{name}({payload[:60]!r}): {code} {exc.details()!r}")

        atheris.Setup(sys.argv, one)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
