"""A token bucket: at most ``rate_per_s`` events per second on average, ``burst`` at once.

Pure state and arithmetic; the caller passes the clock, so tests need no sleeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TokenBucket"]


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float = field(default=-1.0)
    updated_s: float | None = None

    def __post_init__(self):
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, now_s: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens at time ``now_s``; False (and nothing spent) when too few."""
        if self.updated_s is not None:
            self.tokens = min(self.burst,
                              self.tokens + max(now_s - self.updated_s, 0.0) * self.rate_per_s)
        self.updated_s = now_s
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False
