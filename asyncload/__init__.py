"""asyncload: an asyncio-native streaming data loader for PyTorch training on slow storage.

``import asyncload as al``; ``await ds[i]`` fetches a sample, ``al.Loader`` batches many
fetches in flight with backpressure, for ``async for``, a plain ``for`` or torch's DataLoader.
torch is never imported by ``import asyncload``.
"""

from . import drift, sources, validation
from .batching import PadCollate
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
from .disk_cache import DiskCache
from .drift import DriftError, DriftMonitor, DriftWarning, RunningStats
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
from .folders import ImageFolder, decode_image
from .loader import Loader
from .mixing import MixedDataset, StratifiedSampler, mix
from .resilience import CircuitBreaker, Retry, Throttle
from .tiered import TieredCache
from .validation import Array, Bytes, Float, Int, Schema, SchemaError, Str, Value

__version__ = "0.1.0"

__all__ = [
    "Array",
    "AsyncDataset",
    "AsyncIterableDataset",
    "AsyncloadError",
    "Bytes",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConcatDataset",
    "DiskCache",
    "DriftError",
    "DriftMonitor",
    "DriftWarning",
    "ErrorBudgetExceeded",
    "Float",
    "HTTPStatusError",
    "ImageFolder",
    "Int",
    "LRUCache",
    "Loader",
    "MixedDataset",
    "ObjectTooLargeError",
    "PadCollate",
    "Retry",
    "RunningStats",
    "SampleError",
    "SampleFiltered",
    "Schema",
    "SchemaError",
    "Str",
    "StratifiedSampler",
    "Subset",
    "Throttle",
    "TieredCache",
    "TruncatedBodyError",
    "ValidationError",
    "Value",
    "decode_image",
    "default_collate",
    "drift",
    "from_sequence",
    "from_torch",
    "mix",
    "sources",
    "validation",
]
