"""Paces Python's cyclic garbage collector in a controller with many agents.

Every connected agent holds two gRPC streams, and each stream is a few hundred Python objects
(its coroutine, call, context, metadata, and the futures of the read it waits on) that live
for seconds or for as long as the agent does: about a million at 10,000 agents. CPython's
collector walks the ones that survived its last pass, so its generation-1 passes took
0.1-0.2 s every ~2 s there and its full passes 0.6-1.8 s, pauses of the event loop in which no
report is read (measured at 10,000 agents of ``benchmarks/controller_load.py`` with gc callbacks
added to the controller for the purpose, and not kept).

Reference counting frees nearly all of it anyway: the collector is only needed for cycles,
and a cycle that outlives its objects' use comes from agents that went away. So once the
controller tracks ``min_agents`` agents (below, a pass is short), ``CollectionPacer.tick``
turns automatic collection off and runs passes itself:

- a *full* pass when agents registered since the last full pass number over a quarter of the
  agents then (``growth``): the agents grew, or came and went, by that much, which is when
  old streams can have left cycles behind (and when CPython's own rule would run one); and
  every ``full_every_s`` (an hour) in any case;
- a *young* pass (generations 0 and 1: only what was allocated since the last pass) every
  ``young_every_s``, which frees the cycles of short-lived objects. At 10,000 agents in a
  steady state it takes about 20 ms, where a full pass takes 0.6-1.8 s and frees nothing.

Below ``min_agents`` again, or at ``close()``, the collector is back as it was.
"""
from __future__ import annotations

import gc
import logging
import time

__all__ = ["CollectionPacer"]

log = logging.getLogger("adaptrun.controller")


class CollectionPacer:
    def __init__(self, min_agents: int = 500, growth: float = 1.25, young_every_s: float = 60.0,
                 full_every_s: float = 3600.0, clock=time.monotonic):
        self.min_agents, self.growth = min_agents, growth
        self.young_every_s, self.full_every_s = young_every_s, full_every_s
        self.clock = clock
        self._agents = -1                # agents at the last full pass (-1: not pacing)
        self._registrations = 0          # registrations counted at the last full pass
        self._full_s = self._young_s = 0.0
        self._was_enabled = True
        self.full_passes = self.young_passes = 0

    @property
    def pacing(self) -> bool:
        return self._agents >= 0

    def tick(self, agents: int, registrations: int) -> str | None:
        """Called often: ``agents`` the controller tracks now, ``registrations`` ever made.
        Returns "full" or "young" when it just ran that pass, else None."""
        if agents < self.min_agents:
            self.close()
            return None
        now = self.clock()
        if not self.pacing:
            self._was_enabled = gc.isenabled()
            gc.disable()
        elif (registrations - self._registrations <= (self.growth - 1.0) * self._agents
              and now - self._full_s < self.full_every_s):
            if now - self._young_s < self.young_every_s:
                return None
            self._young_s = now
            self.young_passes += 1
            self._collect(1, agents)
            return "young"
        self._agents, self._registrations = agents, registrations
        self._full_s = self._young_s = now
        self.full_passes += 1
        self._collect(2, agents)
        return "full"

    @staticmethod
    def _collect(generation: int, agents: int) -> None:
        t0 = time.perf_counter()
        freed = gc.collect(generation)
        log.debug("generation-%d collection at %d agents: %d objects freed in %.3f s",
                  generation, agents, freed, time.perf_counter() - t0)

    def close(self) -> None:
        """Hand collection back to CPython (as it was before pacing began)."""
        if self.pacing:
            if self._was_enabled:
                gc.enable()
            self._agents = -1
