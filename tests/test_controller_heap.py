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


def test_pacing_collects_on_growth_churn_and_time_and_hands_collection_back():
    assert gc.isenabled()
    now = [0.0]
    p = CollectionPacer(min_agents=100, growth=1.25, young_every_s=60.0, full_every_s=600.0,
                        clock=lambda: now[0])
    try:
        assert p.tick(99, 99) is None and gc.isenabled()             # few agents: as CPython
        gone = _garbage_cycle()
        assert p.tick(100, 100) == "full" and not gc.isenabled()     # pacing: one pass now
        assert gone() is None
        gone = _garbage_cycle()
        assert p.tick(125, 125) is None and gone() is not None       # held until a pass
        assert p.tick(126, 126) == "full" and gone() is None         # grew by over a quarter
        # Churn: as many agents as before, but a third of them came and went since the pass.
        assert p.tick(126, 126 + 31) is None
        assert p.tick(126, 126 + 32) == "full"
        # Time: a young pass every young_every_s frees a cycle made since the last pass ...
        gone = _garbage_cycle()
        now[0] = 59.0
        assert p.tick(126, 158) is None and gone() is not None
        now[0] = 60.0
        assert p.tick(126, 158) == "young" and gone() is None
        # ... but not one whose objects outlived a pass (the full pass's job): every
        # full_every_s in any case.
        held = _Cycle()
        gone = weakref.ref(held)
        gc.collect(1)               # it lives through a pass (now in the oldest generation)
        del held                    # ... and then becomes garbage
        now[0] = 120.0
        assert p.tick(126, 158) == "young" and gone() is not None
        now[0] = 600.0
        assert p.tick(126, 158) == "full" and gone() is None
        assert (p.full_passes, p.young_passes) == (4, 2)
        assert p.tick(50, 158) is None and gc.isenabled()            # few again: handed back
        assert p.tick(200, 200) == "full" and not gc.isenabled()
    finally:
        p.close()
    assert gc.isenabled()
