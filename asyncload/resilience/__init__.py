"""Retry, circuit breaking and throttling for flaky storage: usable alone and as `Loader` options."""

from __future__ import annotations

from asyncload.resilience.breaker import CircuitBreaker
from asyncload.resilience.classify import is_transient, retry_after
from asyncload.resilience.retry import Retry, backoff_delay
from asyncload.resilience.throttle import Throttle, is_throttling

__all__ = [
    "CircuitBreaker",
    "Retry",
    "Throttle",
    "backoff_delay",
    "is_throttling",
    "is_transient",
    "retry_after",
]
