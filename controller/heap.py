"""Paces Python's cyclic garbage collector in a controller with many agents.

Every connected agent holds two gRPC streams, and each stream is a few hundred Python objects
(its coroutine, call, context, metadata, and the futures of the read it waits on) that live
for seconds or for as long as the agent does: about a million at 10,000 agents. CPython's
collector walks the ones that survived its last pass, so its generation-1 passes took
0.1-0.2 s every ~2 s there and its full passes 0.3-1.2 s, pauses of the event loop in which no
report is read (``benchmarks/controller_load.py``: p99 report latency 1.2-1.7 s; 20 ms with
the collector off and no policy runs).

Reference counting frees nearly all of it anyway: the collector is only needed for cycles.
``CollectionPacer.tick`` therefore turns automatic collection off once the controller tracks
``min_agents`` agents (below, a pass is short), and runs one full collection itself whenever
the agents grew by a quarter since the last (when CPython would run one too) and every
``every_s`` seconds: one pause of about a second every few minutes at 10,000 agents instead
of one every two seconds, and the cyclic garbage of those minutes held meanwhile. Below
``min_agents`` again, or at ``close()``, the collector is back as it was.
"""
from __future__ import annotations

import gc
import logging
import time

__all__ = ["CollectionPacer"]

log = logging.getLogger("adaptrun.controller")


class CollectionPacer:
    def __init__(self, min_agents: int = 500, growth: float = 1.25, every_s: float = 300.0,
                 clock=time.monotonic):
        self.min_agents, self.growth, self.every_s = min_agents, growth, every_s
        self.clock = clock
        self._agents = -1                # agents at the last collection (-1: not pacing)
        self._last_s = 0.0
        self._was_enabled = True
        self.collections = 0

    @property
    def pacing(self) -> bool:
        return self._agents >= 0

    def tick(self, agents: int) -> bool:
        """Called often (``agents``: how many the controller tracks now); True if it just
        collected."""
        if agents < self.min_agents:
            self.close()
            return False
        if self.pacing and agents <= self._agents * self.growth \
                and self.clock() - self._last_s < self.every_s:
            return False
        if not self.pacing:
            self._was_enabled = gc.isenabled()
            gc.disable()
        t0 = time.perf_counter()
        freed = gc.collect()
        self._agents, self._last_s = agents, self.clock()
        self.collections += 1
        log.debug("full collection at %d agents: %d objects freed in %.3f s", agents, freed,
                  time.perf_counter() - t0)
        return True

    def close(self) -> None:
        """Hand collection back to CPython (as it was before pacing began)."""
        if self.pacing:
            if self._was_enabled:
                gc.enable()
            self._agents = -1
