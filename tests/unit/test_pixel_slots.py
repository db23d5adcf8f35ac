"""The shared block through which decode processes hand pixels back (handler/pixel_slots.py),
and `prepare_requests` writing into it; in this process (the pool's own tests run it across
processes: tests/integration/test_handler.py, tests/e2e/test_serving.py)."""

import errno
import os
from multiprocessing import shared_memory

import numpy as np
import pytest

from handler import pixel_slots
from handler.pixel_slots import InSlot, PixelSlots, SlotTarget, make_slots, write_slot
from handler.preparation import PreparationFailure, prepare_requests

pytestmark = pytest.mark.unit

SHAPE = (3, 8, 8)


def pixels(value: int, dtype=np.uint8) -> np.ndarray:
    return np.full(SHAPE, value, dtype)


@pytest.fixture
def slots():
    block = PixelSlots(4, SHAPE, np.uint8)
    yield block
    pixel_slots._attached.clear()
    block.close()


def exists(name: str) -> bool:
    try:
        shared_memory.SharedMemory(name=name).close()
    except FileNotFoundError:
        return False
    return True


def test_a_slot_written_by_name_is_taken_back_as_a_copy(slots):
    where = write_slot(slots.layout, 2, pixels(7))
    assert where == InSlot(slots.layout.name, 2)
    taken = slots.take(where)
    assert taken.dtype == np.uint8 and taken.shape == SHAPE and (taken == 7).all()
    write_slot(slots.layout, 2, pixels(9))  # the next batch reuses the slot: what was taken stays
    assert (taken == 7).all() and (slots.take(where) == 9).all()


def test_pixels_of_another_block_are_refused_not_misread(slots):
    with pytest.raises(RuntimeError, match="not to the worker's"):
        slots.take(InSlot("psm_elsewhere", 0))


def test_a_process_lets_go_of_a_block_the_worker_replaced(slots):
    write_slot(slots.layout, 0, pixels(1))
    newer = PixelSlots(8, SHAPE, np.uint8)
    try:
        write_slot(newer.layout, 7, pixels(3))
        assert list(pixel_slots._attached) == [newer.layout.name]
        assert (newer.take(InSlot(newer.layout.name, 7)) == 3).all()
    finally:
        pixel_slots._attached.clear()
        newer.close()


def test_fits_checks_count_shape_and_dtype(slots):
    assert slots.fits(4, SHAPE, np.uint8) and slots.fits(1, SHAPE, np.uint8)
    assert not slots.fits(5, SHAPE, np.uint8)
    assert not slots.fits(4, (3, 16, 16), np.uint8) and not slots.fits(4, SHAPE, np.float32)


def test_close_unlinks_the_block_and_a_dropped_block_is_unlinked_too():
    block = PixelSlots(2, SHAPE, np.float32)
    name = block.layout.name
    assert exists(name)
    block.close()
    assert not exists(name)
    dropped = PixelSlots(2, SHAPE, np.float32)
    name = dropped.layout.name
    del dropped  # garbage: its finalizer unlinks it (and runs at exit for a block still held)
    assert not exists(name)


def test_a_block_that_cannot_be_reserved_is_none_and_leaves_nothing(monkeypatch, caplog):
    """/dev/shm too small (Docker's default 64 MB): posix_fallocate says ENOSPC in the worker,
    instead of a SIGBUS in a process writing to a page that was never there."""
    made = []
    real = shared_memory.SharedMemory

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(shared_memory, "SharedMemory", recording)
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    assert make_slots(64, (3, 384, 384), np.uint8) is None
    assert "no shared memory for 64 decoded images (27 MB)" in caplog.text and "--shm-size" in caplog.text
    assert len(made) == 1 and not exists(made[0].name)


def test_prepare_requests_writes_pixels_into_the_requests_slots(slots):
    def prepare(row, _preparation):
        if row == "bad":
            raise ValueError("not an image")
        return f"plan {row}", pixels(row)

    target = SlotTarget(slots.layout, (3, 1, 0))  # batch indices of the task's rows, in order
    outcomes = prepare_requests([5, "bad", 6], None, prepare, target)
    assert outcomes[0] == ("plan 5", InSlot(slots.layout.name, 3))
    assert outcomes[1] == PreparationFailure(400, "not an image")
    assert outcomes[2] == ("plan 6", InSlot(slots.layout.name, 0))
    assert (slots.take(outcomes[0][1]) == 5).all() and (slots.take(outcomes[2][1]) == 6).all()


def test_a_slot_that_cannot_be_written_fails_its_request_with_a_500(slots):
    gone = pixel_slots.SlotLayout("psm_gone_block", 4, SHAPE, np.dtype(np.uint8).str)
    outcomes = prepare_requests([5], None, lambda row, _: ("plan", pixels(row)), SlotTarget(gone, (0,)))
    assert outcomes[0].status == 500 and "could not be handed back" in outcomes[0].message
