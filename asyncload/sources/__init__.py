"""Bytes from storage: each source is an :class:`~asyncload.AsyncDataset` over a list of keys."""

from .files import FileSource
from .http import HTTPSource

__all__ = ["FileSource", "HTTPSource"]
