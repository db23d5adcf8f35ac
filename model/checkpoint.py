"""Loading the seed checkpoint: a bfloat16 state dict, read with `weights_only=True`.

Accepts checkpoints saved with either backbone key layout, transformers 5's
(`vision_encoder.backbone.model.layer.N.`) and transformers 4's (`vision_encoder.backbone.layer.N.`),
and loads them into the transformers-5 model this package builds (pyproject requires
transformers >= 5); any missing, unexpected or mis-shaped key is a `CheckpointError` that
names the keys.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from transformers.initialization import no_init_weights  # skips the random init the checkpoint overwrites

from .captioner import CaptionModel
from .config import CaptionConfig

_BACKBONE_V4 = re.compile(r"^vision_encoder\.backbone\.layer\.(\d+)\.")
_BACKBONE_V5 = "vision_encoder.backbone.model.layer.{}."
_SHOWN_KEYS = 8
# What a checkpoint's tensors may be: the seed's bfloat16, or a float32/float16 copy of it.
CHECKPOINT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) format
_LFS_POINTER_PREFIX = b"version https://git-lfs"


class CheckpointError(ValueError):
    """The file is not a usable seed checkpoint (message says why and names keys)."""


def normalise_keys(state_dict: dict) -> dict:
    """Rename transformers-4 backbone keys to the transformers-5 layout this package builds."""
    return {_BACKBONE_V4.sub(lambda m: _BACKBONE_V5.format(m.group(1)), k): v for k, v in state_dict.items()}


def expected_shapes(config: CaptionConfig) -> dict[str, tuple[int, ...]]:
    """Every key and shape of a checkpoint for `config`, from a model built on the meta device."""
    with torch.device("meta"):
        model = CaptionModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return ", ".join(keys[:_SHOWN_KEYS]) + more


def validate_state_dict(state_dict: dict, config: CaptionConfig) -> None:
    expected = expected_shapes(config)
    problems = []
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    wrong = [
        f"{k} is {tuple(state_dict[k].shape)}, expected {expected[k]}"
        for k in sorted(expected.keys() & state_dict.keys())
        if tuple(state_dict[k].shape) != expected[k]
    ]
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped key(s): " + "; ".join(wrong[:_SHOWN_KEYS]))
    unusable = [f"{k} ({str(v.dtype).removeprefix('torch.')}, {str(v.layout).removeprefix('torch.')}"
                f"{', meta' if v.is_meta else ''})" for k, v in sorted(state_dict.items())
                if v.dtype not in CHECKPOINT_DTYPES or v.layout != torch.strided or v.is_meta]
    if unusable:
        problems.append(f"{len(unusable)} key(s) not dense floating-point weights "
                        f"({', '.join(str(d).removeprefix('torch.') for d in CHECKPOINT_DTYPES)}): {_listing(unusable)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config: " + " | ".join(problems))


def read_state_dict(path: str | Path) -> dict:
    """torch.load with weights_only=True and mmap, with clear errors for non-checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as file:
        head = file.read(len(_LFS_POINTER_PREFIX))
    if head.startswith(_LFS_POINTER_PREFIX):
        raise CheckpointError(f"{path} is a Git LFS pointer file, not the checkpoint: fetch the LFS object "
                              "(git lfs pull, or python -m weights fetch)")
    if not head.startswith(_ZIP_MAGIC):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint in torch.save's zip format ({len(head)} first "
                              f"bytes {head[:8]!r}); a legacy-format file can be re-saved with torch.save")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:  # weights_only refused something that is not plain tensors
        reason = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
        raise CheckpointError(f"{path} holds objects other than tensors and was refused unread"
                              f"{': ' + reason.group(1) if reason else ''}") from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails anywhere in the unpickler
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(loaded).__name__})")
    return loaded


def load_state_dict(path: str | Path, config: CaptionConfig) -> dict:
    state_dict = normalise_keys(read_state_dict(path))
    validate_state_dict(state_dict, config)
    return state_dict


def load_model(path: str | Path, config: CaptionConfig, device="cpu", dtype=torch.float32) -> CaptionModel:
    """Build the model without initialising weights, load the checkpoint strictly, cast, eval."""
    state_dict = load_state_dict(path, config)
    with no_init_weights():
        model = CaptionModel(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
