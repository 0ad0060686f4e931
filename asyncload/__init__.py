"""asyncload: an asyncio-native streaming data loader for PyTorch training on slow storage.

``import asyncload as al``; ``await ds[i]`` fetches a sample, ``al.Loader`` batches many
fetches in flight with backpressure, for ``async for``, a plain ``for`` or torch's DataLoader.
torch is never imported by ``import asyncload``.
"""

from . import sources
from .cache import LRUCache
from .collate import default_collate
from .datasets import (
    AsyncDataset,
    AsyncIterableDataset,
    ConcatDataset,
    Subset,
    from_sequence,
    from_torch,
)
from .errors import (
    AsyncloadError,
    CircuitOpenError,
    ErrorBudgetExceeded,
    HTTPStatusError,
    ObjectTooLargeError,
    SampleError,
    SampleFiltered,
    TruncatedBodyError,
    ValidationError,
)
from .loader import Loader
from .resilience import CircuitBreaker, Retry, Throttle

__version__ = "0.1.0"

__all__ = [
    "AsyncDataset",
    "AsyncIterableDataset",
    "AsyncloadError",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConcatDataset",
    "ErrorBudgetExceeded",
    "HTTPStatusError",
    "LRUCache",
    "Loader",
    "ObjectTooLargeError",
    "Retry",
    "SampleError",
    "SampleFiltered",
    "Subset",
    "Throttle",
    "TruncatedBodyError",
    "ValidationError",
    "default_collate",
    "from_sequence",
    "from_torch",
    "sources",
]
