"""The agent's /healthz (agents/health.py) over real HTTP on 127.0.0.1: alive while the loop
beats, 503 once a training loop has been silent past its limit, 404 elsewhere."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from adaptrun.agents import health as health_mod
from adaptrun.agents.health import AgentHealth


def _get(port: int, path: str = "/healthz") -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body.startswith(b"{") else {}


@pytest.mark.timeout(30)
def test_healthz_follows_the_agents_loop(monkeypatch):
    h = AgentHealth(wait_limit_s=600)
    port = h.serve("127.0.0.1", 0)
    try:
        code, body = _get(port)
        assert code == 200 and body["state"] == "starting"
        h.beat("training", generation=3, nodes=2)
        h.beat("training")                       # the loop's own beats keep the detail
        code, body = _get(port)
        assert code == 200 and body["generation"] == 3 and body["nodes"] == 2
        monkeypatch.setattr(health_mod, "TRAINING_LIMIT_S", 0.0)   # a loop silent too long
        code, body = _get(port)
        assert code == 503 and body["state"] == "training" and body["since_beat_s"] > 0
        h.beat("joining", generation=4)          # a join may wait up to the join timeout
        assert _get(port)[0] == 200
        assert _get(port, "/metrics")[0] == 404
        h.beat("done")
        assert _get(port)[0] == 200
    finally:
        h.close()
