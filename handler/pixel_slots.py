"""Shared memory through which decode processes hand a batch's pixels back to their worker.

Pickled through the process pool's one result pipe, a 384 px image's uint8 pixels (442 kB)
cost the worker ~0.3 ms of CPU and the batch ~0.7 ms of wall time per image on a 2-core host,
serialised behind the pipe. Instead the worker keeps one block of slots, one per request of a
batch (by batch index), reserved in full when made (`posix_fallocate`: a block larger than
what /dev/shm has left fails here, in the worker, not later as a SIGBUS in a process writing to
it); a process writes each request's pixels into its slot and returns only which block it
wrote. Where no block can be made (Docker's default /dev/shm is 64 MB) the pixels travel
pickled, as before.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotLayout:
    """A block as a process needs to know it (picklable): its name, and `count` slots of
    `shape` and `dtype` (a numpy dtype string)."""

    name: str
    count: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def array_shape(self) -> tuple[int, ...]:
        return (self.count, *self.shape)


@dataclass(frozen=True)
class SlotTarget:
    """Where one task writes its requests' pixels: `layout`'s slots `indices` (batch indices)."""

    layout: SlotLayout
    indices: tuple[int, ...]


@dataclass(frozen=True)
class InSlot:
    """A request's pixels, written to slot `index` of block `block` (what a task returns in place
    of the array)."""

    block: str
    index: int


def block_bytes(count: int, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Size of a block of `count` slots of `shape` pixels in `dtype`."""
    return count * int(np.prod(shape)) * np.dtype(dtype).itemsize


class PixelSlots:
    """The worker's block: made (and reserved) here, read by copying a slot out, unlinked by `close`."""

    def __init__(self, count: int, shape: tuple[int, ...], dtype: np.dtype):
        dtype = np.dtype(dtype)
        size = block_bytes(count, shape, dtype)
        self._memory = shared_memory.SharedMemory(create=True, size=size)
        try:
            if hasattr(os, "posix_fallocate"):  # Linux; elsewhere the pages come on first write
                os.posix_fallocate(self._memory._fd, 0, size)  # noqa: SLF001 - the block's own descriptor
        except BaseException:
            self._memory.close()
            self._memory.unlink()
            raise
        # Unlinked by `close`, else when the worker exits (a worker killed by a signal leaves
        # that to multiprocessing's resource tracker, which warns of it).
        self._unlink = weakref.finalize(self, self._memory.unlink)
        self.layout = SlotLayout(self._memory.name, count, tuple(shape), dtype.str)
        self._view = np.ndarray(self.layout.array_shape, dtype, buffer=self._memory.buf)

    def fits(self, count: int, shape: tuple[int, ...], dtype: np.dtype) -> bool:
        layout = self.layout
        return count <= layout.count and tuple(shape) == layout.shape and np.dtype(dtype).str == layout.dtype

    def take(self, where: InSlot) -> np.ndarray:
        """A copy of a slot's pixels (no view of the block outlives its batch)."""
        if where.block != self.layout.name:
            raise RuntimeError(f"pixels written to block {where.block}, not to the worker's {self.layout.name}")
        return self._view[where.index].copy()

    def close(self) -> None:
        del self._view  # the block's buffer cannot close while an array exports it
        self._memory.close()
        self._unlink()


def make_slots(count: int, shape: tuple[int, ...], dtype: np.dtype) -> PixelSlots | None:
    """A block of `count` slots, or None (logged) where none can be made: the pixels then travel
    pickled."""
    try:
        return PixelSlots(count, shape, dtype)
    except (OSError, ValueError) as error:
        size_mb = block_bytes(count, shape, dtype) / 2**20
        logger.warning("no shared memory for %d decoded images (%.0f MB): %s; their pixels travel through pipes "
                       "(slower). Give the container a larger /dev/shm (docker run --shm-size=1g).",
                       count, size_mb, error)
        return None


# ------------------------------------------------------------------ in a decode process
_attached: dict[str, tuple[shared_memory.SharedMemory, np.ndarray]] = {}


def write_slot(layout: SlotLayout, index: int, pixels: np.ndarray) -> InSlot:
    """Write `pixels` into slot `index` of `layout`'s block, attaching to it on first use (and
    letting go of a block the worker has since replaced)."""
    if layout.name not in _attached:
        stale = [memory for memory, _ in _attached.values()]
        _attached.clear()  # the arrays first: a block cannot close while one exports it
        for memory in stale:
            memory.close()
        memory = shared_memory.SharedMemory(name=layout.name)
        _attached[layout.name] = (memory, np.ndarray(layout.array_shape, np.dtype(layout.dtype), buffer=memory.buf))
    _attached[layout.name][1][index] = pixels
    return InSlot(layout.name, index)
