"""WebDataset-layout tar shards, streamed from local files, HTTP(S) or S3.

Each shard is parsed as its bytes arrive (nothing is downloaded whole first); consecutive
members that share a key (``a/b.jpg``, ``a/b.cls``) form one sample
``{"__key__": "a/b", "jpg": b"...", "cls": b"..."}`` (and ``"__url__": shard`` with
``with_url=True``).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import operator
import os
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._redact import redact_url
from .._tar import iter_members, iter_samples
from .._threads import run_abandonable
from ..datasets import AsyncIterableDataset
from ..streaming import StreamEpoch, StreamError, aclosing, equal_length, shuffle_buffer
from .s3 import check_key

__all__ = ["TarShardSource"]

Sample = dict[str, Any]
Item = Sample | StreamError
Piece = tuple[str, int, int | None]  # a shard, and the samples [start, stop) to read of it


class TarShardSource(AsyncIterableDataset[Sample]):
    """A stream of samples from WebDataset-layout tar shards.

    ``shards``: local paths (or ``file://``), ``http(s)://`` URLs (fetched by an
    `~asyncload.sources.HTTPSource` built with ``http_options``) and ``s3://bucket/key``
    URLs (an `~asyncload.sources.S3Source` per bucket, built with ``s3_options``).

    Under a `~asyncload.Loader`:

    - shards are split across ranks as DistributedSampler splits samples (the epoch's
      shard order padded by wrapping around, or trimmed with ``drop_last``, to a multiple
      of the ranks; rank ``r`` takes shards ``r, r + ranks, ...``), and a rank's shards
      across its DataLoader workers, so every rank reads as many shards and each shard
      is read once per epoch, but for the padding; ``shuffle=True`` permutes the shard order and passes the
      samples through the loader's ``shuffle_buffer``, both seeded by ``(seed, epoch)``;
    - ``samples_per_shard`` (one count, or one per shard) tells the loader how many
      samples there are: then the epoch's samples are dealt out as contiguous runs of
      the shard order, equal in number for every share (``ceil(total / shares)``, the
      last runs wrapping around to pad; ``floor`` with ``drop_last``), so ranks stay in
      step and each sample is read once; a shard on a boundary is read in part by each
      of the two shares that meet there. The counts must be right: a shard with more
      samples than declared has its extra samples left out, one with fewer makes its
      share repeat samples to make up the count;
    - ``prefetch_shards`` shards of a share are read at once, in the background, ahead of
      the one being consumed, so a slow store is read over several connections (for HTTP
      shards, at most ``http_options``' ``max_connections``, for S3 shards at most
      ``s3_options``' when it is set: a reader ahead holds its connection while it waits);
    - the loader's ``retry`` and ``timeout`` apply to opening a shard and to each read: a
      shard that fails part-way is opened again and the samples already given are passed
      over, so nothing is lost or repeated; a shard that still fails becomes a sample
      error under the loader's ``on_error`` (``key`` names the shard), as does a sample
      with an unsafe member name (absolute, or with ``..``), a member over
      ``max_member_bytes``, two members with the same extension, or a hard link to a
      member of another sample (``key`` names the shard and member): the whole sample,
      never a part of it;
    - a shard that starts with gzip's magic number (``.tar.gz``) is decompressed as it is
      read; errors name the shard and the offset in the tar stream.

    Each sample is ``{"__key__": ..., "<ext>": bytes, ...}``; ``with_url=True`` adds
    ``"__url__"``, the shard it came from (as WebDataset does). Nothing is ever written to
    disk: member names are only used as sample keys.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        samples_per_shard: int | Sequence[int] | None = None,
        prefetch_shards: int = 4,
        chunk_size: int = 1 << 20,
        max_member_bytes: int = 1 << 30,
        http_options: Mapping[str, Any] | None = None,
        s3_options: Mapping[str, Any] | None = None,
        with_url: bool = False,
    ) -> None:
        if isinstance(shards, str):
            raise TypeError("TarShardSource: shards must be a list of paths or URLs, not a str")
        self.shards = [_shard_name(shard) for shard in shards]
        if not isinstance(with_url, bool):
            raise TypeError(f"TarShardSource: with_url must be True or False, got {with_url!r}")
        self.with_url = with_url
        if not self.shards:
            raise ValueError("TarShardSource: shards is empty")
        counts: list[int] | None
        if samples_per_shard is None:
            counts = None
        elif not hasattr(samples_per_shard, "__iter__") or _is_0d(samples_per_shard):
            # One count: an int, a numpy integer, a 0-d array or tensor.
            counts = [_count(samples_per_shard)] * len(self.shards)
        else:  # any iterable of counts (a list, an array, a tensor, a dict's values)
            counts = [_count(n) for n in samples_per_shard]
            if len(counts) != len(self.shards):
                raise ValueError(
                    f"TarShardSource: samples_per_shard has {len(counts)} counts for "
                    f"{len(self.shards)} shards"
                )
        if counts is not None and any(n < 0 for n in counts):
            raise ValueError("TarShardSource: samples_per_shard must be >= 0")
        for name, value in (
            ("prefetch_shards", prefetch_shards),
            ("chunk_size", chunk_size),
            ("max_member_bytes", max_member_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TarShardSource: {name} must be an int >= 1, got {value!r}")
        self.counts = counts
        self.prefetch_shards = prefetch_shards
        self.chunk_size = chunk_size
        self.max_member_bytes = max_member_bytes
        self.http_options = dict(http_options or {})
        self.s3_options = dict(s3_options or {})
        self._http: Any = None
        self._s3: dict[str, Any] = {}
        # The shards' sources are made now, so that a bad option (an unknown keyword, a
        # malformed endpoint_url) is refused here, naming it, not at the first shard of a
        # run. Making them opens nothing: connections come per event loop, on first use.
        for shard in self.shards:
            if shard.startswith("s3://"):
                check_key(shard[len("s3://") :].partition("/")[2], f"TarShardSource: {shard!r}")
            try:
                if shard.startswith(("http://", "https://")):
                    option = "http_options"
                    self._http_source()
                elif shard.startswith("s3://"):
                    option = "s3_options"
                    self._s3_source(shard[len("s3://") :].partition("/")[0])
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"TarShardSource: {option}: {exc}") from exc

    def __repr__(self) -> str:
        return f"<TarShardSource of {len(self.shards)} shards>"

    def num_samples(self) -> int | None:
        return None if self.counts is None else sum(self.counts)

    # -- opening shards ----------------------------------------------------------------------

    def _http_source(self) -> Any:
        if self._http is None:
            from .http import HTTPSource

            self._http = HTTPSource([], **self.http_options)
        return self._http

    def _open(self, shard: str) -> AsyncIterator[bytes]:
        if shard.startswith(("http://", "https://")):
            chunks: AsyncIterator[bytes] = self._http_source().iter_chunks(shard, self.chunk_size)
            return chunks
        if shard.startswith("s3://"):
            bucket, _, key = shard[len("s3://") :].partition("/")
            chunks = self._s3_source(bucket).iter_chunks(key, self.chunk_size)
            return chunks
        if shard.startswith("file://"):
            # A URL: percent-encoded (Path.as_uri() writes a space as %20).
            shard = url2pathname(urlsplit(shard).path)
        return _file_chunks(shard, self.chunk_size)

    def _s3_source(self, bucket: str) -> Any:
        source = self._s3.get(bucket)
        if source is None:
            from .s3 import S3Source

            source = self._s3[bucket] = S3Source(bucket, [], **self.s3_options)
        return source

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        for source in self._s3.values():
            await source.aclose()

    # -- one shard, with retries ---------------------------------------------------------------

    async def _shard_items(self, piece: Piece, spec: StreamEpoch) -> AsyncGenerator[Item, None]:
        """Samples ``start`` to ``stop`` (``None``: the end) of a shard, each once. A failed
        read is retried under ``spec.retry`` by opening the shard again and passing over
        the samples already given; when the policy gives up, one `StreamError` stands for
        the rest of the piece."""
        shard, start, stop = piece
        shown = _shown(shard)
        retry, given, attempt = spec.retry, 0, 0
        started = retry.now() if retry is not None else 0.0
        while True:
            attempt += 1
            given_before = given
            chunks = _with_timeout(self._open(shard), spec.timeout, shown)
            seen = 0
            try:
                async with (
                    aclosing(iter_members(chunks, self.max_member_bytes, where=shown)) as members,
                    aclosing(iter_samples(members, shard, with_url=self.with_url)) as samples,
                ):
                    async for item in samples:
                        seen += 1
                        if seen > start + given:
                            yield item
                            given += 1
                            if stop is not None and start + given >= stop:
                                return
                return
            except Exception as exc:
                if retry is not None and given > given_before:
                    # This open delivered samples: the failure is a new one, whose attempts
                    # and deadline count from here (a long shard read for minutes, cut
                    # once, is reopened; resets spread over it do not add up).
                    attempt, started = 1, retry.now()
                delay = (
                    None if retry is None else retry.next_delay(attempt, exc, retry.now() - started)
                )
                if delay is None:
                    # Standing for the rest of the piece: with a known end, as many samples
                    # (else the share would be padded with repeats of its other samples).
                    rest = 1 if stop is None else max(1, stop - start - given)
                    yield StreamError(exc, key=shown, count=rest)
                    return
                if spec.on_retry is not None:
                    spec.on_retry(attempt, exc, delay)
            finally:
                await chunks.aclose()
            await retry.sleep(delay)

    # -- an epoch ------------------------------------------------------------------------------

    def _pieces(self, spec: StreamEpoch) -> list[Piece]:
        """What this share reads in this epoch.

        Without known sizes, whole shards, dealt to ranks as DistributedSampler deals
        samples: the epoch's shard order is padded by wrapping around (or trimmed, with
        ``drop_last``) to a multiple of the ranks, rank ``r`` takes shards ``r, r + ranks,
        ...`` of it, and its DataLoader worker ``w`` of ``W`` every ``W``-th of those from
        its ``w``-th: every rank reads the same number of shards. With them (``samples_per_shard``), the epoch's samples are
        laid end to end in shard order and each share takes a run of them: its ``length``
        from ``slot * length`` (wrapping around to pad; a DataLoader worker, its ``run``
        of that), or without a ``length`` (a part
        of a mix) its share of the total, the first ``total % shares`` shares one more
        than the others (as a stride over the samples would give). Every sample is read by
        exactly one share, and a shard on a boundary is read in part by each of the two
        shares that meet there.
        """
        order = list(range(len(self.shards)))
        if spec.shuffle:
            order = spec.rng().permutation(len(order)).tolist()
        if self.counts is None:
            ranks = max(1, min(spec.ranks, spec.shares))  # (a spec made by hand may not say)
            workers = max(1, spec.shares // ranks)
            rank, worker = divmod(spec.slot, workers)
            if len(order) % ranks:
                # Equal shard counts per rank, as the contract has it (a rank short of a
                # shard would leave the others waiting in DDP): the padding shards are read
                # twice in the epoch. Equal sample counts need samples_per_shard.
                keep = len(order) // ranks * ranks
                if not spec.drop_last:
                    keep += ranks
                order = [order[i % len(order)] for i in range(keep)]
            mine = order[rank::ranks][worker::workers]
            return [(self.shards[i], 0, None) for i in mine]
        counts = [self.counts[i] for i in order]
        starts = [0, *itertools.accumulate(counts)][:-1]
        total = sum(counts)
        if spec.length is None:
            each, extra = divmod(total, spec.shares)
            need = each + (spec.slot < extra)
            at = spec.slot * each + min(spec.slot, extra)
        else:
            need, at = spec.length, spec.slot * spec.length
            if spec.run is not None:  # a DataLoader worker's part of it
                offset, need = spec.run
                at += offset
            at = at % total if total else 0
        pieces: list[Piece] = []
        while need > 0 and total:
            i = bisect.bisect_right(starts, at) - 1  # the shard holding sample `at`
            offset = at - starts[i]
            take = min(counts[i] - offset, need)
            pieces.append((self.shards[order[i]], offset, offset + take))
            need -= take
            at = (at + take) % total
        return pieces

    def epoch_stream(self, spec: StreamEpoch) -> AsyncIterator[Any]:
        pieces = self._pieces(spec)

        def open_stream() -> AsyncIterator[Any]:
            stream = self._samples(pieces, spec)
            if spec.shuffle:
                stream = shuffle_buffer(stream, spec.buffer_size, spec.rng(spec.slot, 1))
            return stream

        if spec.length is None:
            return open_stream()
        length = spec.length if spec.run is None else spec.run[1]
        return equal_length(open_stream, length, repr(self))

    async def _samples(self, pieces: list[Piece], spec: StreamEpoch) -> AsyncIterator[Item]:
        """The samples of ``pieces`` in order, read ``prefetch_shards`` pieces at a time."""
        readers = self.prefetch_shards
        if any(shard.startswith(("http://", "https://")) for shard, _, _ in pieces):
            # A reader holds a pool connection while it waits for room in its buffer. With
            # more readers than connections, the shard being consumed could wait for a
            # connection (to open, or to reopen after a cut) held by a reader that waits for
            # the consumer: a deadlock. When each reader can have one, all make progress.
            readers = min(readers, self._http_source().max_connections)
        s3_shard = next((shard for shard, _, _ in pieces if shard.startswith("s3://")), None)
        if s3_shard is not None:
            # The same for S3 shards, when s3_options set max_connections (for every bucket).
            bucket = s3_shard[len("s3://") :].partition("/")[0]
            limit = self._s3_source(bucket).max_connections
            if limit is not None:
                readers = min(readers, limit)
        if spec.start_soon is None or readers == 1:
            for piece in pieces:
                async with aclosing(self._shard_items(piece, spec)) as items:
                    async for item in items:
                        yield item
            return
        # Readers run in the epoch's task group (a generator must not hold a task group
        # open across a yield); each fills a small stream, drained here in shard order.
        scopes: list[anyio.CancelScope] = []
        pending: deque[MemoryObjectReceiveStream[Item]] = deque()
        queued = iter(pieces)

        def start_next() -> None:
            piece = next(queued, None)
            if piece is not None:
                send, receive = anyio.create_memory_object_stream[Item](64)
                scopes.append(anyio.CancelScope())
                assert spec.start_soon is not None
                spec.start_soon(self._reader, piece, spec, send, scopes[-1])
                pending.append(receive)

        try:
            for _ in range(readers):
                start_next()
            while pending:
                with pending.popleft() as receive:
                    async for item in receive:
                        yield item
                start_next()
        finally:
            for scope in scopes:
                scope.cancel()
            for receive in pending:
                receive.close()

    async def _reader(
        self,
        piece: Piece,
        spec: StreamEpoch,
        send: MemoryObjectSendStream[Item],
        scope: anyio.CancelScope,
    ) -> None:
        with scope, send:
            items = self._shard_items(piece, spec)
            try:
                async for item in items:
                    await send.send(item)
            except anyio.BrokenResourceError:
                pass  # the consumer stopped reading this shard
            finally:
                await items.aclose()

    async def __aiter__(self) -> AsyncIterator[Sample]:
        """Every sample of every shard, in order; a failed shard raises."""
        async with aclosing(self.epoch_stream(StreamEpoch())) as stream:
            async for item in stream:
                if type(item) is StreamError:
                    raise item.exc
                yield item


def _shard_name(shard: object) -> str:
    # (str(b"/x.tar") would be the path "b'/x.tar'": not found, at the first shard)
    if isinstance(shard, (str, os.PathLike)):
        name = os.fspath(shard)
        if isinstance(name, str):
            scheme, sep, rest = name.partition("://")
            if sep and scheme.lower() in ("http", "https", "s3", "file"):
                # A URL scheme in any case (HTTP://...), not a local path.
                name = scheme.lower() + sep + rest
            return name
    raise TypeError(f"TarShardSource: shards must be str paths or URLs, got {shard!r}")


def _is_0d(value: object) -> bool:
    return getattr(value, "ndim", None) == 0


def _count(n: Any) -> int:
    """A sample count: an int (a numpy integer too), not a float, str or bool."""
    if not isinstance(n, bool):
        with contextlib.suppress(TypeError):
            return operator.index(n)
    raise TypeError(
        "TarShardSource: samples_per_shard must be an int or a sequence of ints, "
        f"got {type(n).__name__} {n!r}"
    )


def _shown(shard: str) -> str:
    """A shard's name for messages: a URL without its credentials and query string."""
    return redact_url(shard) if "://" in shard else shard


async def _with_timeout(
    chunks: AsyncIterator[bytes], seconds: float | None, shown: str
) -> AsyncGenerator[bytes, None]:
    """``chunks``, each read bounded by ``seconds``: a stalled shard fails like a stalled
    request."""
    async with aclosing(chunks):
        while True:
            try:
                with anyio.move_on_after(seconds) as scope:  # None: no limit
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            if scope.cancelled_caught:
                raise TimeoutError(f"{shown}: no data for {seconds} s")
            yield chunk


async def _file_chunks(path: str, chunk_size: int) -> AsyncIterator[bytes]:
    # One thread hop per chunk of a megabyte: the hop costs far less than the read. Both
    # abandoned on a timeout or close, as FileSource's reads (a stuck network mount); a
    # file opened after its caller left is closed in its thread.
    file = await run_abandonable(open, path, "rb", discard=_close)
    reading = False
    try:
        while True:
            reading = True
            chunk = await run_abandonable(file.read, chunk_size)
            reading = False
            if not chunk:
                return
            yield chunk
    finally:
        if reading:
            # A read left behind: close() would wait for its lock here, in the event loop,
            # for as long as the read hangs. Closed by a thread of its own once it returns.
            threading.Thread(target=file.close, name="asyncload-close", daemon=True).start()
        else:
            file.close()  # quick for a file opened for reading; must run when cancelled


def _close(file: Any) -> None:
    file.close()
