"""Issue 11, security: mutual TLS on the controller's gRPC port, per-job tokens on every RPC,
the refusal of plaintext off loopback, `adaptrun certs`, and no secret on /metrics.

Certificates come from `adaptrun certs` in tmp_path; everything listens on 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys

import grpc
import pytest

from adaptrun.generated import control_plane_pb2 as pb
from adaptrun.generated import control_plane_pb2_grpc as pb_grpc
from adaptrun.controller.actuators.local import LocalActuator
from adaptrun.controller.auth import ServerSecurity, TokenTable
from adaptrun.controller.core import ControllerConfig
from adaptrun.controller.server import Controller, ControllerError
from controller_support import AGENT, BOUNDS, register, report, sample, scrape

CLI = [sys.executable, "-m", "adaptrun.cli"]
TOKEN_A = "tok-job-a-0123456789abcdef"
TOKEN_B = "tok-job-b-0123456789abcdef"
OPERATOR = "tok-operator-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    out = subprocess.run([*CLI, "certs", str(d), "--hosts", "localhost,127.0.0.1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return d


@pytest.fixture()
def tokens_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text(f"# job token\njob-a {TOKEN_A}\njob-b {TOKEN_B}\n* {OPERATOR}\n")
    return f


@contextlib.contextmanager
def controller(security: ServerSecurity, **cfg):
    config = ControllerConfig(**{"policy_interval_s": 0.2, "tick_s": 0.05, "max_threads": 32,
                                 "rdzv_port": None, **cfg})
    ctl = Controller(config, actuator=LocalActuator(), security=security).start()
    try:
        yield ctl
    finally:
        ctl.stop(grace_s=0.2)


def mtls_channel(pki, target, with_cert=True):
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if with_cert else None,
        certificate_chain=(pki / "client.crt").read_bytes() if with_cert else None)
    return grpc.secure_channel(target, creds)


def bearer(token):
    return (("authorization", f"Bearer {token}"),) if token else ()


def _cli(*args, env=None, timeout=30):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


# --- transport ---------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_certs_writes_private_keys_0600(pki):
    names = sorted(p.name for p in pki.iterdir())
    assert names == ["ca.crt", "ca.key", "client.crt", "client.key", "server.crt", "server.key"]
    for p in pki.glob("*.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert b"PRIVATE KEY" in p.read_bytes()


@pytest.mark.timeout(60)
def test_mtls_accepts_the_client_cert_and_refuses_others(pki):
    sec = ServerSecurity(tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
                         tls_ca=str(pki / "ca.crt"))
    with controller(sec) as ctl:
        with mtls_channel(pki, ctl.address) as ch:
            assert register(pb_grpc.ControllerStub(ch), "job-a").agent_id
        # TLS without a client certificate: the handshake fails
        with mtls_channel(pki, ctl.address, with_cert=False) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ControllerStub(ch).ListJobs(pb.ListJobsRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # plaintext to the TLS port
        with grpc.insecure_channel(ctl.address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ControllerStub(ch).ListJobs(pb.ListJobsRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # the CLI with --tls-*: status works; without the client cert it cannot connect
        tls = ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"),
               "--tls-key", str(pki / "client.key")]
        out = _cli("status", "--controller", ctl.address, "--json", *tls)
        assert out.returncode == 0 and '"job-a"' in out.stdout, out.stderr
        out = _cli("status", "--controller", ctl.address, "--tls-ca", str(pki / "ca.crt"),
                   "--timeout-s", "3")
        assert out.returncode == 2 and "UNAVAILABLE" in out.stderr


@pytest.mark.timeout(60)
def test_plaintext_off_loopback_is_refused_before_binding(tmp_path):
    # host 0.0.0.0 without TLS: refused in the constructor, nothing started or bound
    with pytest.raises(ControllerError, match=r"refusing to listen on 0\.0\.0\.0:\d+ in "
                                              r"plaintext: give --tls-cert/--tls-key"):
        Controller(ControllerConfig(host="0.0.0.0", port=0, metrics_port=None,
                                    rdzv_port=None))
    out = _cli("controller", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "0",
               "--rdzv-port", "none")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "--tls-cert/--tls-key" in out.stderr and "--insecure" in out.stderr
    # a client: plaintext to a non-loopback controller is refused as well
    out = _cli("status", "--controller", "192.0.2.1:50051")
    assert out.returncode == 2 and "refusing plaintext" in out.stderr
    # a token never comes from a flag value
    out = _cli("status", "--controller", "127.0.0.1:1", "--token", "x")
    assert out.returncode == 2 and "No such option" in out.stderr


# --- tokens ------------------------------------------------------------------------------

def _calls(stub, token, job, agent_id):
    """Each RPC of the service, for ``job`` with ``token``: name -> callable."""
    md = bearer(token)
    return {
        "Register": lambda: stub.Register(pb.RegisterRequest(
            job_id=job, node="intruder", slots=1, address="127.0.0.1:9", bounds=BOUNDS),
            timeout=5, metadata=md),
        "StreamReports": lambda: list(stub.StreamReports(
            iter([report(job, step=99, local_batch=8)]),
            metadata=((AGENT, agent_id), *md), timeout=5)),
        "WatchDirectives": lambda: next(iter(stub.WatchDirectives(pb.WatchDirectivesRequest(
            job_id=job, agent_id=agent_id), metadata=md, timeout=5))),
        "ListJobs": lambda: stub.ListJobs(pb.ListJobsRequest(job_id=job), timeout=5,
                                          metadata=md),
        "SetBounds": lambda: stub.SetBounds(pb.SetBoundsRequest(
            job_id=job, min_workers=3, max_workers=4), timeout=5, metadata=md),
    }


def _snapshot(ctl, job_id):
    j = ctl.core.registry.job(job_id)
    with j.changed:
        return (sorted(j.agents), j.bounds.min_replicas, j.bounds.max_replicas, j.accepted,
                j.generation, j.last_report.step if j.last_report else None)


@pytest.mark.timeout(90)
def test_tokens_guard_every_rpc(tokens_file):
    sec = ServerSecurity(tokens=TokenTable.load(tokens_file))
    # The policy runs only when asked (SetBounds below): a directive of its own between the
    # two snapshots would read as a refused call that changed the job.
    with controller(sec, policy_interval_s=60.0) as ctl, \
            grpc.insecure_channel(ctl.address) as ch:
        stub = pb_grpc.ControllerStub(ch)
        agent_a = stub.Register(pb.RegisterRequest(
            job_id="job-a", node="n0", slots=1, address="127.0.0.1:1", bounds=BOUNDS),
            timeout=5, metadata=bearer(TOKEN_A)).agent_id
        acks = list(stub.StreamReports(iter([report("job-a", step=s) for s in (1, 2)]),
                                       metadata=((AGENT, agent_a), *bearer(TOKEN_A)), timeout=5))
        assert len(acks) == 2
        stub.Register(pb.RegisterRequest(job_id="job-b", node="m0", slots=1,
                                         address="127.0.0.1:2", bounds=BOUNDS),
                      timeout=5, metadata=bearer(TOKEN_B))
        before = _snapshot(ctl, "job-a")
        refused = 0
        for token, want in ((None, grpc.StatusCode.UNAUTHENTICATED),
                            ("wrong-token-0123456789", grpc.StatusCode.UNAUTHENTICATED),
                            (TOKEN_B, grpc.StatusCode.PERMISSION_DENIED)):
            for name, call in _calls(stub, token, "job-a", agent_a).items():
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == want, (token, name, e.value.details())
                assert TOKEN_A not in e.value.details() and TOKEN_B not in e.value.details()
                refused += 1
        assert _snapshot(ctl, "job-a") == before, "a refused call changed the job"
        # another job's token cannot use the header spelled the other way either
        with pytest.raises(grpc.RpcError) as e:
            stub.ListJobs(pb.ListJobsRequest(job_id="job-a"), timeout=5,
                          metadata=(("adaptrun-token", TOKEN_B),))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        refused += 1

        # a job's token sees its own job only; and may not scale it (the operator's call)
        resp = stub.ListJobs(pb.ListJobsRequest(), timeout=5, metadata=bearer(TOKEN_B))
        assert [j.job_id for j in resp.jobs] == ["job-b"]
        resp = stub.ListJobs(pb.ListJobsRequest(), timeout=5,
                             metadata=(("adaptrun-token", TOKEN_A),))
        assert [j.job_id for j in resp.jobs] == ["job-a"]
        with pytest.raises(grpc.RpcError) as e:
            stub.SetBounds(pb.SetBoundsRequest(job_id="job-a", min_workers=2, max_workers=4),
                           timeout=5, metadata=bearer(TOKEN_A))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        refused += 1
        # the operator sees every job and scales
        resp = stub.ListJobs(pb.ListJobsRequest(), timeout=5, metadata=bearer(OPERATOR))
        assert [j.job_id for j in resp.jobs] == ["job-a", "job-b"]
        s = stub.SetBounds(pb.SetBoundsRequest(job_id="job-a", min_workers=2, max_workers=4),
                           timeout=5, metadata=bearer(OPERATOR))
        assert s.bounds.min_workers == 2
        text = scrape(ctl)
        assert sample(text, "adaptrun_rejected_reports_total", job_id="",
                      reason="unauthorized") == refused


@pytest.mark.timeout(90)
def test_status_and_scale_cli_with_tokens(tmp_path, tokens_file):
    sec = ServerSecurity(tokens=TokenTable.load(tokens_file))
    with controller(sec) as ctl, grpc.insecure_channel(ctl.address) as ch:
        stub = pb_grpc.ControllerStub(ch)
        for job, token in (("job-a", TOKEN_A), ("job-b", TOKEN_B)):
            stub.Register(pb.RegisterRequest(job_id=job, node="n0", slots=1,
                                             address="127.0.0.1:1", bounds=BOUNDS),
                          timeout=5, metadata=bearer(token))
        env = {k: v for k, v in os.environ.items() if k != "ADAPTRUN_TOKEN"}
        out = _cli("status", "--controller", ctl.address, env=env)
        assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr
        out = _cli("status", "--controller", ctl.address, env={**env, "ADAPTRUN_TOKEN": TOKEN_A})
        assert out.returncode == 0, out.stderr
        assert re.search(r"^job-a\s", out.stdout, re.M) and "job-b" not in out.stdout
        op = tmp_path / "operator-token"
        op.write_text(OPERATOR + "\n")
        out = _cli("scale", "job-b", "--min-workers", "1", "--max-workers", "3",
                   "--controller", ctl.address, env={**env, "ADAPTRUN_TOKEN": TOKEN_B})
        assert out.returncode == 2 and "PERMISSION_DENIED" in out.stderr
        out = _cli("scale", "job-b", "--min-workers", "1", "--max-workers", "3",
                   "--controller", ctl.address, "--token-file", str(op), env=env)
        assert out.returncode == 0 and "workers [1, 3]" in out.stdout, out.stderr


@pytest.mark.timeout(60)
def test_metrics_expose_no_token_key_or_path(pki, tokens_file):
    sec = ServerSecurity(tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
                         tls_ca=str(pki / "ca.crt"), tokens=TokenTable.load(tokens_file))
    with controller(sec) as ctl:
        with mtls_channel(pki, ctl.address) as ch:
            stub = pb_grpc.ControllerStub(ch)
            agent = stub.Register(pb.RegisterRequest(job_id="job-a", node="n0", slots=1,
                                                     address="127.0.0.1:1", bounds=BOUNDS),
                                  timeout=5, metadata=bearer(TOKEN_A)).agent_id
            list(stub.StreamReports(iter([report("job-a", step=1)]),
                                    metadata=((AGENT, agent), *bearer(TOKEN_A)), timeout=5))
            with pytest.raises(grpc.RpcError):
                stub.ListJobs(pb.ListJobsRequest(), timeout=5, metadata=bearer("bad" * 8))
        text = scrape(ctl)
    assert 'job_id="job-a"' in text and 'reason="unauthorized"' in text
    secrets = [TOKEN_A, TOKEN_B, OPERATOR, "bad" * 8, str(pki), str(tokens_file), "tokens",
               "PRIVATE KEY", "BEGIN", ".key", ".crt"]
    secrets += [(pki / n).read_text().splitlines()[1] for n in ("server.key", "client.key",
                                                                 "ca.key")]
    leaked = [s for s in secrets if s in text]
    assert not leaked, leaked


# --- a real agent through an mTLS controller -----------------------------------------------

@pytest.mark.timeout(180)
def test_agent_trains_through_an_mtls_controller(tmp_path, pki, tokens_file):
    from test_agent import LSQ, agent_argv, check_exactly_once
    from workers import harness

    sec = ServerSecurity(tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
                         tls_ca=str(pki / "ca.crt"), tokens=TokenTable.load(tokens_file))
    out = tmp_path / "out"
    out.mkdir()
    token = tmp_path / "token"
    token.write_text(TOKEN_A)
    log = tmp_path / "agent.log"
    proc = None
    # the store binds loopback (the default --rdzv-host); it has no TLS
    with controller(sec, rdzv_port=0, metrics_port=None, policy_interval_s=0.5) as ctl:
        try:
            argv = agent_argv("job-a", "n0", controller_addr=ctl.address,
                              snapshot_dir=tmp_path / "snap",
                              worker=[LSQ, "--out", str(out), "--samples", "256",
                                      "--epochs", "1"],
                              extra=["--tls-ca", str(pki / "ca.crt"),
                                     "--tls-cert", str(pki / "client.crt"),
                                     "--tls-key", str(pki / "client.key"),
                                     "--token-file", str(token)])
            env = harness.base_env()
            env.pop("ADAPTRUN_TOKEN", None)
            proc = harness.start(argv, env, log)
            assert harness.wait_all([proc], 150) == [0], harness.tail(log)
            job = ctl.core.registry.job("job-a")
            assert job is not None and job.accepted > 0, harness.tail(log)
            assert "hosted by the controller" in harness.tail(log, 100000)
        finally:
            harness.stop(proc)
    check_exactly_once(out)
    assert TOKEN_A not in harness.tail(log, 1 << 20)


@pytest.mark.timeout(60)
def test_plaintext_health_port_serves_health_only(pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sec = ServerSecurity(tls_cert=str(pki / "server.crt"), tls_key=str(pki / "server.key"),
                         tls_ca=str(pki / "ca.crt"))
    config = ControllerConfig(metrics_port=None, rdzv_port=None)
    ctl = Controller(config, actuator=LocalActuator(), security=sec, health_port=0).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ctl.health_port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ControllerStub(ch).ListJobs(pb.ListJobsRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        ctl.stop(grace_s=0.2)
