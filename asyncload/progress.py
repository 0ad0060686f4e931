"""Watching a loader run: a progress bar, and statistics handed to a callback every N
batches (for TensorBoard, Prometheus, a log line)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Reporter"]


class Reporter:
    """Called as each batch reaches the consumer. ``statistics`` is the loader's
    ``statistics()``; ``on_statistics(snapshot)`` gets it every ``every`` batches and at
    the end of the epoch; ``bar`` is a tqdm progress bar (``total`` batches when known,
    from ``initial``: a resumed epoch's),
    its line refreshed at most twice a second, so a batch costs a counter update."""

    def __init__(
        self,
        statistics: Callable[[], dict[str, Any]],
        *,
        bar: bool,
        total: int | None,
        on_statistics: Callable[[dict[str, Any]], object] | None,
        every: int,
        initial: int = 0,
        details: bool = True,
    ) -> None:
        self.statistics = statistics
        # False: the bar shows batches and their rate only (statistics kept elsewhere:
        # DataLoader workers count their own).
        self.details = details
        self.on_statistics = on_statistics
        self.every = every
        self.batches = 0
        self._sent: dict[str, Any] | None = None  # _counts(...) of the last snapshot sent
        self._bar: Any = None
        self._next_refresh = 0.0
        if bar:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                raise ImportError(
                    "Loader(progress=True) needs tqdm: pip install tqdm (or asyncload[progress])"
                ) from None
            self._bar = tqdm(total=total, initial=initial, unit="batch", dynamic_ncols=True)

    def batch(self) -> None:
        self.batches += 1
        if self.on_statistics is not None and self.batches % self.every == 0:
            try:
                self._send(self.statistics())
            except BaseException:
                # The batch is not delivered (the loader takes it back out of its
                # statistics too): the bar must not count it.
                self.batches -= 1
                raise
        if self._bar is not None:
            self._bar.update(1)
            now = time.monotonic()
            if self.details and now >= self._next_refresh:
                self._next_refresh = now + 0.5
                self._bar.set_postfix_str(describe(self.statistics()), refresh=False)

    def end(self) -> None:
        """The last snapshot, unless the one sent at the last batch already says it all:
        an epoch that failed after it (or before any batch) is still reported."""
        try:
            if self.on_statistics is not None:
                snapshot = self.statistics()
                if _counts(snapshot) != self._sent:
                    self._send(snapshot)
        finally:  # a callback that raises still leaves no bar open
            if self._bar is not None:
                if self.details:
                    self._bar.set_postfix_str(describe(self.statistics()), refresh=False)
                self._bar.close()
                self._bar = None

    def _send(self, snapshot: dict[str, Any]) -> None:
        assert self.on_statistics is not None
        # A copy of its own: the callback may change the snapshot (drain its error_log).
        self._sent = copy.deepcopy(_counts(snapshot))
        self.on_statistics(snapshot)


# Timings, not counts: what moves with the clock, or with a fetch the epoch no longer
# wanted (one cancelled as the loop left).
_TIMED = frozenset(
    {"elapsed_seconds", "samples_per_second"}
    | {f"fetch_latency_{p}" for p in ("p50", "p90", "p99")}
)


def _counts(s: dict[str, Any]) -> dict[str, Any]:
    # Whatever may change after the last batch: samples filtered, skipped or fetched (a
    # dropped tail, with its cache lookups) at the end, fetches and batches let go.
    return {k: v for k, v in s.items() if k not in _TIMED}


def describe(s: dict[str, Any]) -> str:
    """A one-line summary of a statistics snapshot."""
    lookups = s["cache_hits"] + s["cache_misses"]
    parts = [
        f"{s['samples_per_second']:,.0f} samples/s",
        f"in flight {s['in_flight']}",
        f"buffered {s['buffered']}",
    ]
    if lookups:
        parts.append(f"cache hits {s['cache_hits'] / lookups:.0%}")
    if s["retries"]:
        parts.append(f"retries {s['retries']}")
    if s["errors"]:
        parts.append(f"errors {s['errors']}")
    return ", ".join(parts)
