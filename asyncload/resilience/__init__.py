"""Retry and circuit breaking for flaky storage: usable alone and as `Loader` options."""

from __future__ import annotations

from asyncload.resilience.breaker import CircuitBreaker
from asyncload.resilience.classify import is_transient, retry_after
from asyncload.resilience.retry import Retry, backoff_delay

__all__ = ["CircuitBreaker", "Retry", "backoff_delay", "is_transient", "retry_after"]
