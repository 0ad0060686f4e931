"""Bytes from storage: each source is an :class:`~asyncload.AsyncDataset` over a list of keys."""

from .files import FileSource
from .http import HTTPSource
from .npy import NpySource
from .s3 import S3PrefixStream, S3Source
from .tar import TarShardSource

__all__ = ["FileSource", "HTTPSource", "NpySource", "S3PrefixStream", "S3Source", "TarShardSource"]
