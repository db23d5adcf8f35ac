"""The handler's own configuration: the ``handler:`` section of ``model-config.yaml``.

TorchServe reads the top-level keys of ``model-config.yaml`` (``minWorkers``, ``batchSize``,
``responseTimeout`` ...) itself and hands the whole parsed file to the worker as
``context.model_yaml_config``. The ``handler:`` section is ours; it is parsed and validated
here once, when a worker starts, so that a typo fails the model registration with a clear
message instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import torch

from handler.instances import MAX_INSTANCES_LIMIT
from handler.cpu_cores import usable_cores
from handler.preparation import gpu_decode_processes
from model.image import DEFAULT_MAX_PIXELS
from model.layouts import LAYOUTS, STATIC_LAYOUTS
from model.precision import AUTO, DTYPE_CHOICES, resolve_dtype
from model.sampling import ROW_KEY_STRIDE
from model.styles import MIN_REPETITION_PENALTY, Limits

ON_GPU = "gpu"  # a setting that applies on CUDA devices only
# Files that must travel inside the archive: nothing the model needs is read from elsewhere.
ARCHIVE_FILES = ("model_config", "vocab")


class SettingsError(ValueError):
    """The ``handler:`` section of model-config.yaml is invalid."""


@dataclass(frozen=True)
class HandlerSettings:
    # Files inside the model directory (the extracted archive). `weights` defaults to the
    # manifest's serializedFile.
    weights: str | None = None
    model_config: str = "caption_config.json"
    vocab: str = "model/assets/vocab.txt"
    # Precision per device kind: bfloat16 halves the memory traffic on GPUs (tensor cores).
    # "auto" on CPU: bfloat16 where the CPU multiplies it in hardware (AVX-512 BF16, AMX),
    # else float32, which is then both faster and exact (model/precision.py).
    gpu_dtype: str = "bfloat16"
    cpu_dtype: str = AUTO
    # Opt-in on CPU ("int8"): the decoder's weights in int8 per channel, each row's activations
    # quantized on its own (model/quantize.py). Half the bfloat16 weight bytes and 8-bit dot
    # products: faster steps (with cpu_compile_decode), slightly different numbers. The rest of
    # the model stays in cpu_dtype.
    cpu_quantize: str | None = None
    # On CPU (float32, and bfloat16 where oneDNN multiplies it): decoder Linears reordered once
    # into oneDNN's blocked layout, faster for the few-row products of a decode step (see
    # model/packing.py). Ignored with cpu_quantize, compile_decode or compile_prefill (those
    # compiled paths take plain Linears; cpu_compile_decode keeps the packed ones).
    cpu_prepack: bool = True
    # Opt-in on CPU: the eager decode step through torch.compile (engine `compile_step`: inductor
    # fuses the small operators between the packed products; every size symbolic). Faster steps
    # for minutes of compilation at a cold start (model-config.yaml gives the figures). With
    # cpu_quantize it keeps the int8 products. Not with compile_decode: true (the static
    # CUDA-graph step).
    cpu_compile_decode: bool = False
    # torch.compile of the vision encoder (static N x 3 x S x S shapes) and of the decode step
    # with token selection (one CUDA graph per row bucket): true, false, or "gpu" = only on a
    # CUDA device. On CPU the oneDNN-packed eager decoder is faster than this compiled one, and
    # compiling costs minutes of start-up on a few cores (cpu_compile_decode compiles the packed
    # eager step instead).
    compile_encoder: bool | str = ON_GPU
    compile_decode: bool | str = ON_GPU
    # torch.compile of the two prefill passes (image prefix, then `[style] [CLS]` per group),
    # image and group counts symbolic: one graph each for every batch. Eager, each pass launches
    # about 30 kernels per layer.
    compile_prefill: bool | str = ON_GPU
    # Compile the decode step once per attention span for all row buckets (the row count a
    # symbolic size), instead of once per bucket and span: a shorter warm-up (H100: 121 s
    # instead of more than 190 s for the defaults), decode steps as fast.
    compile_dynamic_rows: bool = True
    # Static (CUDA-graph) decode cache layout: "rows", each caption row with its own copy of its
    # image's prefix; "images", each image's prefix stored once and read once per step for all
    # its rows (model/kv_cache.py ImageMajorCache; needs compile_dynamic_rows when compiled).
    static_layout: str = "rows"
    # Intra-op threads of this worker; 0 leaves PyTorch's default (all cores). With several
    # CPU workers on one host set it to cores / workers.
    threads: int = 0
    # Parsing, decoding and resizing the requests of one batch runs in a thread pool.
    decode_threads: int = 4
    # > 0: a pool of this many processes instead (decode_threads is then unused); 0: the
    # threads; "gpu": processes on a CUDA device, threads on CPU. About 1 ms per photo-sized
    # request holds the GIL, which threads take in turn (handler/preparation.py). On a CUDA
    # device "gpu" starts the worker's share of the cores less one (`gpu_decode_processes`).
    decode_processes: int | str = ON_GPU
    # PyTorch intra-op threads of each decode thread (its resize and normalisation); 0 keeps
    # PyTorch's default (every core). With the default each of the decode_threads resizes
    # opened its own team of one thread per core: decode_threads x cores threads at once.
    decode_intra_op_threads: int = 1
    # Opt-in: JPEGs at least twice the model's image size on both sides are decoded at 1/2, 1/4
    # or 1/8 scale by libjpeg (never below the image size). A 12 MP photo decodes ~3.6x faster;
    # its pixels differ slightly from the full decode resized (model-config.yaml gives figures).
    jpeg_draft: bool = False
    # Images above this many pixels are refused (decompression bombs); 40 MP is a 7300x5500
    # photo, far above what a 384 px model needs.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Dummy batches at start (one image, then a full batch; with compile_decode every row bucket
    # a full batch within the limits can need) so the first real request does not pay for lazy
    # init or compilation.
    warmup: bool = True
    # Most images one KServe v1 request ({"instances": [...]}) may carry (handler/instances.py).
    max_instances: int = 8
    # Per-request bounds (model.styles.Limits fields).
    limits: Limits = field(default_factory=Limits)

    def dtype_for(self, device: torch.device) -> torch.dtype:
        if device.type == "cuda":
            return resolve_dtype(self.gpu_dtype, device)
        return resolve_dtype(self.cpu_dtype, device)

    def compiles(self, name: str, device: torch.device) -> bool:
        """Whether a compile setting (`compile_encoder`, `compile_decode`, `compile_prefill`) is on
        for this device."""
        value = getattr(self, name)
        return device.type == "cuda" if value == ON_GPU else value

    def decode_process_count(self, device: torch.device) -> int:
        """Decode processes of a worker on `device`; 0 means the decode threads."""
        if self.decode_processes != ON_GPU:
            return self.decode_processes
        if device.type != "cuda":
            return 0
        return gpu_decode_processes(usable_cores(), torch.cuda.device_count())

    @classmethod
    def from_model_yaml(cls, model_yaml_config: dict | None) -> "HandlerSettings":
        """Build from the whole parsed model-config.yaml (``context.model_yaml_config``)."""
        section = (model_yaml_config or {}).get("handler") or {}
        if not isinstance(section, dict):
            raise SettingsError("model-config.yaml: 'handler' must be a mapping")
        return cls.from_dict(section)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "HandlerSettings":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise SettingsError(f"model-config.yaml handler: unknown key(s) {unknown}; allowed: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name == "limits":
                values[name] = _limits(value)
                continue
            default = known[name].default
            values[name] = _check(name, value, default)
        settings = cls(**values)
        for name in ("gpu_dtype", "cpu_dtype"):
            if getattr(settings, name) not in DTYPE_CHOICES:
                raise SettingsError(f"model-config.yaml handler: {name} must be one of {list(DTYPE_CHOICES)}")
        if settings.static_layout not in STATIC_LAYOUTS:
            raise SettingsError(f"model-config.yaml handler: static_layout must be one of {list(STATIC_LAYOUTS)}")
        if LAYOUTS[settings.static_layout].needs_symbolic_sizes and not settings.compile_dynamic_rows:
            raise SettingsError(f"model-config.yaml handler: static_layout {settings.static_layout} needs "
                                "compile_dynamic_rows: true")
        for name in ARCHIVE_FILES:
            path = PurePosixPath(getattr(settings, name))
            if path.is_absolute() or ".." in path.parts or "\\" in str(path) or not path.parts:
                raise SettingsError(f"model-config.yaml handler: {name} must be a path inside the archive "
                                    f"(relative, no '..'), got {getattr(settings, name)!r}")
        if settings.cpu_quantize not in (None, "int8"):
            raise SettingsError("model-config.yaml handler: cpu_quantize must be int8 or absent")
        if settings.cpu_compile_decode and settings.compile_decode is True:
            raise SettingsError("model-config.yaml handler: cpu_compile_decode compiles the packed eager step; "
                                "it cannot go with compile_decode: true")
        if (settings.threads < 0 or settings.decode_threads < 1
                or (settings.decode_processes != ON_GPU and settings.decode_processes < 0)
                or settings.decode_intra_op_threads < 0 or settings.max_pixels < 1
                or not 1 <= settings.max_instances <= MAX_INSTANCES_LIMIT):
            raise SettingsError("model-config.yaml handler: threads >= 0, decode_threads >= 1, decode_processes >= 0 "
                                f"or {ON_GPU!r}, "
                                f"decode_intra_op_threads >= 0, max_pixels >= 1, 1 <= max_instances <= {MAX_INSTANCES_LIMIT}")
        return settings


def _check(name: str, value: Any, default: Any) -> Any:
    if default is None:  # optional path
        if value is not None and not isinstance(value, str):
            raise SettingsError(f"model-config.yaml handler: {name} must be a string")
        return value
    if name == "decode_processes":  # a count, or ON_GPU
        if value != ON_GPU and (isinstance(value, bool) or not isinstance(value, int)):
            raise SettingsError(f"model-config.yaml handler: {name} must be an integer or {ON_GPU!r}, got {value!r}")
        return value
    if default == ON_GPU:  # a compile switch: a boolean, or on CUDA devices only
        if not isinstance(value, bool) and value != ON_GPU:
            raise SettingsError(f"model-config.yaml handler: {name} must be true, false or {ON_GPU!r}, got {value!r}")
        return value
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"model-config.yaml handler: {name} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"model-config.yaml handler: {name} must be an integer, got {value!r}")
        return value
    if not isinstance(value, kind):
        raise SettingsError(f"model-config.yaml handler: {name} must be a {kind.__name__}, got {value!r}")
    return value


def _limits(raw: Any) -> Limits:
    if not isinstance(raw, dict):
        raise SettingsError("model-config.yaml handler: limits must be a mapping")
    known = {f.name: f for f in dataclasses.fields(Limits)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SettingsError(f"model-config.yaml handler.limits: unknown key(s) {unknown}; allowed: {sorted(known)}")
    values = {}
    for name, value in raw.items():
        default = known[name].default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SettingsError(f"model-config.yaml handler.limits: {name} must be a positive number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise SettingsError(f"model-config.yaml handler.limits: {name} must be an integer, got {value!r}")
        values[name] = type(default)(value)
    if values.get("max_num_captions", 0) > ROW_KEY_STRIDE:
        raise SettingsError(f"model-config.yaml handler.limits: max_num_captions must be at most {ROW_KEY_STRIDE} "
                            "(each caption of a style has its own sampling-noise key)")
    if values.get("max_repetition_penalty", MIN_REPETITION_PENALTY) < MIN_REPETITION_PENALTY:
        raise SettingsError("model-config.yaml handler.limits: max_repetition_penalty must be at least "
                            f"{MIN_REPETITION_PENALTY}, the smallest penalty a request may ask for")
    # The engine's KV cache is sized for the config's max_text_tokens; make_plan enforces
    # max_new_tokens <= limits.max_new_tokens, the engine the hard cap.
    return Limits(**values)
