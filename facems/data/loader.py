"""The training input path: a ``DataLoader`` whose workers decode straight into reused shared memory.

:func:`build_face_loader` returns a :class:`FaceLoader`, a ``torch.utils.data.DataLoader`` subclass
that yields ``(images, labels)``: ``images`` uint8 RGB ``(N, 3, H, W)`` with channels_last strides
and ``labels`` int64 ``(N,)``, the values of ``DataLoader(dataset, collate_fn=collate_faces)`` on the
same sampler. Use it like a DataLoader::

    loader = build_face_loader(dataset, sampler, num_workers=8, pin_memory=True)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            ...

Why not the plain DataLoader: a worker's batch reaches the main process through a shared-memory
segment that the worker allocates for every batch and the main process maps and unmaps again.
Measured on the 2-core machine here, filling a fresh 256-image segment cost about 49 us per image
(allocation and first-touch page faults) against 4 us for a segment that is reused, while decoding a
112x112 JPEG costs about 130 us: the transport alone took a quarter of each worker's time.

How the reuse works:

* A *ring* of ``num_slots`` batch buffers ``(num_slots, batch_size, H, W, 3)`` is allocated in shared
  memory in the main process before the workers start (they inherit it through ``fork``, or receive
  it by file descriptor under ``spawn``). The ids of the free slots wait in a pipe.
* A worker takes a free slot id from the pipe (a non-blocking 4-byte read: never waits), decodes the
  batch's images straight into that slot (``RecordFaceDataset.read_into``) and returns only the slot
  id and the labels. When no slot is free it decodes into a fresh shared segment and returns that
  (the plain DataLoader's way): slower, never a deadlock.
* When the main process unpickles a slot batch, it wraps the slot in a tensor with no copy
  (``torch.from_numpy`` of a numpy view that carries a ``weakref.finalize``). When the last tensor
  that uses that memory is freed (the batch, any view of it, a ``.numpy()`` of it), the finalizer
  writes the slot id back into the pipe. A slot is therefore never overwritten while anything still
  references the batch; keeping batches just makes the workers fall back to fresh segments.
* Batches that are dropped unseen (``break`` out of an epoch, then a new epoch: the DataLoader
  discards what the workers had prefetched) are unpickled and freed like any other, so their slots
  come back too.
* With a sampler that has a ``plan()`` (``DistributedPKSampler``), the main process takes each batch
  of indices as one row of the plan instead of drawing ``batch_size`` indices one by one: the same
  batches, with less work in the process that also feeds the workers.

``num_slots`` defaults to ``prefetch_factor * num_workers + 4``: the DataLoader keeps at most
``prefetch_factor * num_workers`` batches in flight, the loop holds the current batch and, while the
next one is fetched, the previous one, and ``pin_memory`` holds one more. The ring costs
``num_slots * batch_size * H * W * 3`` bytes of shared memory (77 MB for 2 workers and 256 faces of
112x112; ``/dev/shm`` must hold it, as it must hold the plain DataLoader's batches in flight).
With ``num_workers=0`` the ring is private memory in the main process, 4 slots.
"""

from __future__ import annotations

import itertools
import multiprocessing.context
import multiprocessing.reduction
import os
import struct
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from facems.data.datasets import _new_batch_buffer

__all__ = ["FaceLoader", "build_face_loader"]

_SLOT = struct.Struct("<i")
_MAX_SLOTS = 4096  # free slot ids wait in a pipe: 4 bytes each, far below its 64 KiB capacity
_IN_PROCESS_SLOTS = 4
_SLOTS_OVER_PREFETCH = 4
_token_counter = itertools.count()
# Rings of this process, by token: a batch unpickled in the main process names its ring's token.
_RINGS: weakref.WeakValueDictionary[str, _SlotRing] = weakref.WeakValueDictionary()


class _FdHandle:
    """Owns a pipe end; closes it when garbage (so never while a ring or a lent batch can write to it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pid = os.getpid()

    def __del__(self) -> None:
        if self._pid == os.getpid():
            try:
                os.close(self.fd)
            except OSError:
                pass


class _SlotRing:
    """Reused batch buffers and the pipe that holds the ids of the free ones (see the module docstring).

    Args:
        num_slots: number of buffers, ``0 <= num_slots <= 4096`` (0: every batch in a fresh buffer).
        batch_size: images per buffer.
        image_size: ``(H, W)``.
        shared: allocate the buffers in shared memory (for worker processes).
    """

    def __init__(self, num_slots: int, batch_size: int, image_size: tuple[int, int], shared: bool) -> None:
        if not 0 <= num_slots <= _MAX_SLOTS:
            raise ValueError(f"num_slots must lie in [0, {_MAX_SLOTS}], got {num_slots}")
        self.num_slots = num_slots
        self.buffers = torch.empty((num_slots, batch_size, *image_size, 3), dtype=torch.uint8)
        if shared and num_slots:
            self.buffers.share_memory_()
        self._array = self.buffers.numpy()
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self._read, self._write = _FdHandle(read_fd), _FdHandle(write_fd)
        self._owner = os.getpid()
        self.token = f"{self._owner}-{next(_token_counter)}"
        self.fallback_batches = 0  # batches the main process received in fresh memory (no free slot)
        for slot in range(num_slots):
            os.write(write_fd, _SLOT.pack(slot))
        _RINGS[self.token] = self

    def acquire(self) -> int | None:
        """A free slot id, or ``None`` when every slot is in use (never blocks)."""
        try:
            data = os.read(self._read.fd, _SLOT.size)
        except BlockingIOError:
            return None
        # Every write is one 4-byte id and every read asks for 4, so reads never split an id.
        return int(_SLOT.unpack(data)[0])

    def release(self, slot: int) -> None:
        """Put ``slot`` back among the free ones (an unlocked 4-byte pipe write: safe in a finalizer)."""
        os.write(self._write.fd, _SLOT.pack(slot))

    def buffer(self, slot: int, n: int) -> np.ndarray:
        """The first ``n`` images of ``slot``, a writable ``(n, H, W, 3)`` view."""
        return self._array[slot, :n]

    def lend(self, slot: int, n: int) -> torch.Tensor:
        """The first ``n`` images of ``slot`` as a ``(n, H, W, 3)`` tensor that frees the slot when garbage."""
        view = self._array[slot, :n]  # a new array object, alive exactly as long as the tensor's storage
        finalizer = weakref.finalize(view, self._return_lent, slot)
        finalizer.atexit = False
        return torch.from_numpy(view)

    def _return_lent(self, slot: int) -> None:
        # A forked child holds copies of the parent's lent arrays; only the owner gives slots back.
        if os.getpid() == self._owner:
            self.release(slot)

    def __getstate__(self) -> dict[str, Any]:
        # Only while a worker process is being spawned (fork copies the ring without pickling).
        if multiprocessing.context.get_spawning_popen() is None:
            raise TypeError("a facems loader's slot ring can only be sent to a worker process it starts")
        state = self.__dict__.copy()
        state["_read"] = multiprocessing.reduction.DupFd(self._read.fd)
        state["_write"] = multiprocessing.reduction.DupFd(self._write.fd)
        state["_array"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._read = _FdHandle(state["_read"].detach())
        self._write = _FdHandle(state["_write"].detach())
        self._array = self.buffers.numpy()


class _SlotBatch:
    """A batch on its way from a worker: the slot that holds its images (or, with no free slot, the
    images in a fresh shared segment) and its labels. Unpickling it in the main process yields
    ``(images, labels)`` directly (see :func:`_receive_batch`)."""

    __slots__ = ("images", "labels", "slot", "token")

    def __init__(self, token: str, slot: int, labels: np.ndarray, images: torch.Tensor | None) -> None:
        self.token, self.slot, self.labels, self.images = token, slot, labels, images

    def __reduce__(self) -> tuple[Any, ...]:
        return _receive_batch, (self.token, self.slot, self.labels, self.images)


def _receive_batch(
    token: str, slot: int, labels: np.ndarray, images: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The main process's side of :class:`_SlotBatch`: ``(uint8 (N, 3, H, W) channels_last, int64 (N,))``."""
    ring = _RINGS.get(token)
    if ring is None:
        raise RuntimeError(f"a batch arrived for facems loader ring {token}, which no longer exists")
    if images is None:
        hwc = ring.lend(slot, len(labels))
    else:
        ring.fallback_batches += 1
        hwc = images
    return hwc.permute(0, 3, 1, 2), torch.from_numpy(labels)


def _pass_batch(batch: Any) -> Any:
    """The ``collate_fn``: :class:`_RingDataset` already returns whole batches."""
    return batch


class _RingDataset(Dataset):
    """Wraps a face dataset for :class:`FaceLoader`: ``__getitems__`` decodes a batch into a ring slot."""

    def __init__(self, faces: Any, batch_size: int) -> None:
        self.faces = faces
        self.batch_size = batch_size
        self.ring: _SlotRing | None = None

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int) -> Any:
        return self.faces[index]

    def __getitems__(self, indices: Sequence[int]) -> Any:
        ring = self.ring
        if ring is None:
            raise RuntimeError("FaceLoader: iterate the loader itself (its ring is made by __iter__)")
        n = len(indices)
        slot = ring.acquire() if n <= self.batch_size else None
        if slot is None:
            hwc = _new_batch_buffer((n, *self.faces.image_size, 3))  # shared inside a worker
            labels = self.faces.read_into(indices, hwc.numpy())
            batch = _SlotBatch(ring.token, -1, labels, hwc)
        else:
            try:
                labels = self.faces.read_into(indices, ring.buffer(slot, n))
            except BaseException:
                ring.release(slot)
                raise
            batch = _SlotBatch(ring.token, slot, labels, None)
        if get_worker_info() is None:  # in-process: nothing is pickled, so build the result here
            return _receive_batch(batch.token, batch.slot, batch.labels, batch.images)
        return batch


class _PlanBatches:
    """The batches of a sampler with a ``plan()`` of shape ``(steps, batch_size)`` (``DistributedPKSampler``):
    what ``BatchSampler(sampler, batch_size)`` yields, one row at a time instead of index by index,
    which spares the main process (which also feeds the workers) most of its per-batch work."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[int]]:
        for row in self.sampler.plan():
            yield row.tolist()

    def __len__(self) -> int:
        return len(self.sampler) // int(self.sampler.batch_size)


class FaceLoader(DataLoader):
    """A ``DataLoader`` of uint8 face batches decoded into reused shared memory; see the module docstring.

    Build it with :func:`build_face_loader`. Iterating yields ``(images, labels)``; ``len()`` is the
    number of batches; ``sampler.set_epoch`` works as usual. :meth:`close` (or ``with loader:``)
    stops persistent workers at once; otherwise they stop when the loader is garbage.

    Attributes:
        faces: the wrapped face dataset (``dataset`` is the internal wrapper).
        num_slots: number of reused batch buffers.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: Sampler[int],
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int,
        persistent_workers: bool,
        num_slots: int,
        multiprocessing_context: str | None,
    ) -> None:
        # Set before DataLoader.__init__, which may already read _index_sampler.
        plan_rows = (
            callable(getattr(sampler, "plan", None)) and getattr(sampler, "batch_size", None) == batch_size
        )
        self._plan_batches = _PlanBatches(sampler) if plan_rows else None
        super().__init__(
            _RingDataset(dataset, batch_size),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=_pass_batch,
            pin_memory=pin_memory,
            drop_last=False,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=persistent_workers and num_workers > 0,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        )
        self.faces = dataset
        self.num_slots = num_slots

    @property
    def _index_sampler(self) -> Any:
        # DataLoader draws its batches of indices from this property (torch's own name).
        if self._plan_batches is not None:
            return self._plan_batches
        return super()._index_sampler

    @property
    def ring(self) -> _SlotRing | None:
        """The slot ring of the current workers (``None`` before the first iteration)."""
        ring: _SlotRing | None = self.dataset.ring  # type: ignore[attr-defined]
        return ring

    def __iter__(self) -> Any:
        wrapper: _RingDataset = self.dataset  # type: ignore[assignment]
        new_workers = self.num_workers > 0 and (not self.persistent_workers or self._iterator is None)
        if new_workers or wrapper.ring is None:
            # Workers take the ring they are started with, so each new set of workers gets its own:
            # slots that a stopped set held are never waited for.
            shape = tuple(self.faces.image_size)
            wrapper.ring = _SlotRing(self.num_slots, self.batch_size or 0, shape, shared=self.num_workers > 0)
        ring = wrapper.ring
        iterator = super().__iter__()
        iterator._facems_ring = ring  # type: ignore[attr-defined]  # keeps the ring alive while it runs
        return iterator

    def close(self) -> None:
        """Stop the persistent workers now (a later iteration starts new ones)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> FaceLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_face_loader(
    dataset: Any,
    sampler: Sampler[int],
    num_workers: int,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    persistent_workers: bool = True,
    *,
    batch_size: int | None = None,
    num_slots: int | None = None,
    multiprocessing_context: str | None = None,
) -> FaceLoader:
    """The training loader: ``(uint8 images (N, 3, H, W) channels_last, int64 labels (N,))`` batches.

    Args:
        dataset: a face dataset with ``image_size`` and ``read_into`` (``RecordFaceDataset``,
            ``ImageFolderFaceDataset``).
        sampler: yields dataset indices, e.g. ``DistributedPKSampler``; call its ``set_epoch``
            before each epoch as with a plain DataLoader.
        num_workers: decoding processes; 0 decodes in the calling process.
        pin_memory: copy each batch to page-locked memory (in the DataLoader's pinning thread).
        prefetch_factor: batches each worker prepares ahead.
        persistent_workers: keep the workers (and their ring) between epochs.
        batch_size: images per batch; default ``sampler.batch_size`` (P * K for the P x K sampler).
        num_slots: reused batch buffers; default ``prefetch_factor * num_workers + 4`` (4 without
            workers). More slots use more shared memory; too few make batches fall back to fresh
            segments (slower, still correct).
        multiprocessing_context: ``"fork"``, ``"spawn"``, ``"forkserver"`` or ``None`` (the default).

    Returns:
        A :class:`FaceLoader` (a ``torch.utils.data.DataLoader``).

    Raises:
        ValueError: a bad count, a sampler without ``batch_size`` when none is given, or a dataset
            without ``read_into`` / ``image_size``.
    """
    if not (hasattr(dataset, "read_into") and hasattr(dataset, "image_size")):
        raise ValueError(
            f"build_face_loader: dataset must be a face dataset with read_into() and image_size "
            f"(RecordFaceDataset, ImageFolderFaceDataset), got {type(dataset).__name__}"
        )
    if batch_size is None:
        batch_size = getattr(sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                f"build_face_loader: {type(sampler).__name__} has no batch_size; pass batch_size="
            )
    if batch_size < 1:
        raise ValueError(f"build_face_loader: batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"build_face_loader: num_workers must be >= 0, got {num_workers}")
    if prefetch_factor < 1:
        raise ValueError(f"build_face_loader: prefetch_factor must be >= 1, got {prefetch_factor}")
    if num_slots is None:
        num_slots = prefetch_factor * num_workers + _SLOTS_OVER_PREFETCH if num_workers else _IN_PROCESS_SLOTS
    if not 0 <= num_slots <= _MAX_SLOTS:
        raise ValueError(f"build_face_loader: num_slots must lie in [0, {_MAX_SLOTS}], got {num_slots}")
    return FaceLoader(
        dataset,
        sampler,
        batch_size=int(batch_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        persistent_workers=persistent_workers,
        num_slots=num_slots,
        multiprocessing_context=multiprocessing_context,
    )
