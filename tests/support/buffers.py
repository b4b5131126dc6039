"""A real SegmentBuffer that also remembers what it accepted."""

from __future__ import annotations

from typing import Any

from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.buffer import SegmentBuffer


class CollectingBuffer(SegmentBuffer):
    """A real buffer that also remembers what it accepted, in order."""

    def __init__(self, capacity: int, clock: Any, counters: Counters) -> None:
        super().__init__(capacity, clock, counters)
        self.accepted: list[bytes] = []

    def offer(self, doc: bytes) -> bool:
        ok = super().offer(doc)
        if ok:
            self.accepted.append(doc)
        return ok
