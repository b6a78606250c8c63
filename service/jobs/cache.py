"""Rendered response bodies (score bodies, score plots), kept per API process.

Safe to keep: a finished trial's scores are written once and never change (the job's best
trial is fixed once it succeeds), so a body rendered from them never goes stale. Bounded by
bytes, least recently used out first (``cachetools.LRUCache`` weighed by ``len``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from cachetools import LRUCache

Key = tuple[str, int, str]  # (job id, trial number, what was rendered)


class Rendered:
    def __init__(self, max_bytes: int = 256 * 1024**2) -> None:
        self._items: LRUCache[Key, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._lock = threading.Lock()

    def peek(self, key: Key) -> bytes | None:
        """The body kept under ``key``, if any (the lock is held only for the lookup: safe
        on the event loop)."""
        with self._lock:
            return self._items.get(key)

    def get(self, key: Key, render: Callable[[], bytes]) -> bytes:
        """The body kept under ``key``, else ``render()``'s, kept unless it alone is over
        the bound. Rendering runs outside the lock: two requests may both render it."""
        body = self.peek(key)
        if body is None:
            body = render()
            with self._lock:
                if key not in self._items and len(body) <= self._items.maxsize:
                    self._items[key] = body
        return body


RENDERED = Rendered()
