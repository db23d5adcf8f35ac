"""Book-keeping for one TorchServe batch: which requests failed (and how), which go to the model.

Kept out of ``captioner_handler.py`` because TorchServe requires the handler file to define
exactly one class.
"""

from __future__ import annotations

import http
from dataclasses import dataclass, field

import torch

from model.styles import CaptionPlan


@dataclass
class PreparedBatch:
    """The requests of one batch after parsing, validation and image decoding.

    ``good`` lists the batch indexes that reach the model, in order, with their plans and
    pixel tensors; ``errors`` maps every other index to ``(status, message)``; ``shared`` holds
    the indexes whose error is not their own but their engine call's or the whole batch's (out
    of memory, a crash).
    """

    size: int
    errors: dict[int, tuple[int, str]] = field(default_factory=dict)
    good: list[int] = field(default_factory=list)
    plans: list[CaptionPlan] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)
    shared: set[int] = field(default_factory=set)
    decode_ms: float = 0.0

    def fail(self, idx: int, status: int, message: str) -> None:
        self.errors[idx] = (status, message)

    def drop(self, indices) -> None:
        """Keep these requests from the model (they get no result and no error of their own)."""
        keep = [k for k, idx in enumerate(self.good) if idx not in indices]
        self.good = [self.good[k] for k in keep]
        self.plans = [self.plans[k] for k in keep]
        self.pixels = [self.pixels[k] for k in keep]

    def fail_shared(self, indices, status: int, message: str) -> None:
        """Fail these requests for a reason they share (their engine call ran out of memory)."""
        for idx in indices:
            self.errors[idx] = (status, message)
            self.shared.add(idx)

    def fail_unanswered(self, status: int, message: str) -> None:
        """Fail every request without an answer yet (an OOM or a crash of the batch)."""
        self.fail_shared([idx for idx in range(self.size) if idx not in self.errors], status, message)

    def pixel_values(self) -> torch.Tensor:
        return torch.stack(self.pixels) if self.pixels else torch.empty(0)


# RuntimeError texts of failed allocations: PyTorch's CPU allocator, and oneDNN (the CPU
# convolution of the vision encoder) when it cannot allocate its scratch memory.
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "could not create a primitive")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, a Python MemoryError, or a CPU allocator failure (a RuntimeError)."""
    oom_types: tuple[type, ...] = (MemoryError, torch.cuda.OutOfMemoryError)
    if hasattr(torch, "OutOfMemoryError"):
        oom_types += (torch.OutOfMemoryError,)
    if isinstance(exc, oom_types):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def reason_phrase(status: int) -> str:
    """The standard phrase for the HTTP status line. The detailed message goes in the JSON body:
    a phrase built from request data could carry characters a status line must not contain."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"
