"""The controller paces Python's cyclic collector once it tracks many agents
(``controller/heap.py``): automatic passes off, a full one on growth and on a timer, and the
collector handed back below the threshold and at the end."""
from __future__ import annotations

import gc
import weakref

from adaptrun.controller.heap import CollectionPacer


class _Cycle:
    def __init__(self):
        self.me = self


def _garbage_cycle() -> weakref.ref:
    c = _Cycle()
    return weakref.ref(c)                 # only the collector frees it


def test_pacing_collects_on_growth_and_on_time_and_hands_collection_back():
    assert gc.isenabled()
    now = [0.0]
    p = CollectionPacer(min_agents=100, growth=1.25, every_s=60.0, clock=lambda: now[0])
    try:
        assert not p.tick(99) and gc.isenabled()                 # few agents: as CPython
        gone = _garbage_cycle()
        assert p.tick(100) and not gc.isenabled()                # pacing: one pass now
        assert gone() is None
        gone = _garbage_cycle()
        assert not p.tick(125) and gone() is not None            # held until the next pass
        assert p.tick(126) and gone() is None                    # grew by more than a quarter
        now[0] = 59.0
        assert not p.tick(126)
        now[0] = 60.0
        assert p.tick(126)                                       # and every every_s
        assert p.collections == 3
        assert not p.tick(50) and gc.isenabled()                 # few again: handed back
        assert p.tick(200) and not gc.isenabled()
    finally:
        p.close()
    assert gc.isenabled()
