"""The fast batched generation engine.

For a batch of images and caption plans:
1. encode every image once (the vision encoder, optionally `torch.compile`d);
2. prefill each image's 146 prefix positions once: they never attend to the style token, so
   their keys/values are the same for every style and caption;
3. prefill `[style] [CLS]` once per (image, style) group on top of that prefix; its logits
   give the first token of every caption of the group (both prefills optionally
   `torch.compile`d with symbolic image and group counts, `compile_prefill`);
4. decode all caption rows together, one step at a time, with per-row sampling parameters as
   tensors (`model/sampling.py`). Eager: a preallocated cache of each row's own positions,
   the image prefix shared by its rows (`SharedPrefixCache`). Static shapes (for CUDA graphs,
   `compile_decode`): per-bucket caches with fixed addresses (`model/layouts.py`, `model/slots.py`),
   each row with a prefix copy (`static_layout="rows"`) or each image's prefix stored once and
   read once per step for all its rows (`"images"`), and every step after the first one
   captured call of the decoder and token selection together (`decode_select_step`),
   attending over the shortest span of the cache that holds it.
On CPU the eager step can also run compiled (`compile_step`): inductor fuses the ~100 small
operators per layer between the oneDNN-packed products, every size symbolic and batches padded
to at least two images and two rows, so one graph (compiled at warm-up) serves every batch and
compaction.
The host synchronises only every `sync_every` steps to see whether every row has ended;
then finished rows are dropped from the batch (compaction): in eager mode when that halves
its size, with static shapes by moving the live rows into the smallest row bucket that holds
them (that bucket's own cache, state and CUDA graph; image-major: the images with live rows),
so finished rows stop costing work.
"""

from __future__ import annotations

import functools
import logging
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .captioner import CaptionModel
from .checkpoint import load_model
from .config import PRESETS, SEP_ID, STYLE_TOKEN_IDS, CaptionConfig
from .fusion import fuse_projections
from .image import normalize
from .kv_cache import SINGLE_GRAPH_MIN_SIZE, GroupKV, ImageMajorCache, KVCache, PrefixKV, SharedPrefixCache, at_least
from .layouts import DEFAULT_ROWS_PER_IMAGE, LAYOUTS, STATIC_LAYOUTS, STATIC_ROW_BUCKETS
from .packing import has_opaque_linears, prepack_available, prepack_decoder
from .quantize import quantize_decoder
from .sampling import MIN_CANDIDATES, ROW_KEY_STRIDE, RowParams, TokenState, make_row_params, select_next, select_step
from .slots import Placement, in_order, row_major
from .styles import STYLES, CaptionPlan, make_plan, response_key
from .text import tidy_caption
from .tokenizer import VOCAB_PATH, Vocabulary

logger = logging.getLogger(__name__)

# The static step's graph also depends on two sizes of the sampling settings: the top-k
# candidate count (at least `MIN_CANDIDATES` on every path: model/sampling.py) and the longest
# no-repeat n-gram. Raising the n-gram size to this floor gives every batch of default-like
# requests (any styles; top_k <= 64, n-grams <= 4) the same graph, with the same tokens: a
# longer n-gram loop changes no row's choice. Batches needing other sizes step uncompiled
# (`compiled_selection`).
STATIC_MIN_NGRAM = 4
# A compiled prefill treats the image and group counts as symbolic sizes, one graph for every
# batch; torch.compile would specialise a count of 1 into a second graph, so smaller batches
# are padded to this many (copies of the first image / group).
PREFILL_MIN_BATCH = 2
# A static step attends over the cache's first `span` positions: the prefix, `[style] [CLS]`
# and the first half or all of max_text_tokens, the shorter when it holds the step's position.
# The first half of the steps then skips the unwritten tail (H100, 384 rows, 12 layers: 1.51
# ms of attention over 276 positions, 1.18 over 211). Each span is one more graph per row
# bucket to compile at warm-up, so there are only two.
STATIC_SPAN_DIVISORS = (2, 1)
# torch.compile keeps one graph per row bucket and span (dynamic=False) and model/dtype; past
# dynamo's default of 8 per function it would silently fall back to eager.
RECOMPILE_LIMIT = 4 * len(STATIC_ROW_BUCKETS) * len(STATIC_SPAN_DIVISORS)
# The compiled eager step (`compile_step`) treats every size as symbolic. By default dynamo also
# assumes that two sizes equal at the first call stay equal (duck sizing: 6 rows and a tiny
# model's 6 prefix positions), and compiles a new graph when they part. Applied while it traces.
SYMBOLIC_STEP_SIZES = {"use_duck_shape": False}


@dataclass(frozen=True)
class Row:
    image: int
    group: int
    style: str


def plan_rows(plans: list[CaptionPlan], max_text_tokens: int) -> tuple[list[Row], list[tuple[int, str]], list[dict]]:
    """Expand plans into caption rows, (image, style) groups and per-row sampling settings.

    A row generates at most `max_text_tokens` (the model's RoPE table ends there).
    """
    rows, groups, settings = [], [], []
    for image, plan in enumerate(plans):
        seed = plan.seed if plan.seed is not None else secrets.randbits(63)
        for style in plan.styles:
            groups.append((image, style))
            sampling = plan.sampling[style]
            if plan.num_captions[style] > ROW_KEY_STRIDE:
                raise ValueError(f"at most {ROW_KEY_STRIDE} captions per style (their sampling noise keys)")
            for caption in range(plan.num_captions[style]):
                rows.append(Row(image, len(groups) - 1, style))
                settings.append(
                    dict(
                        temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                        repetition_penalty=sampling.repetition_penalty, ngram=sampling.no_repeat_ngram_size,
                        seed=seed, row_key=STYLES.index(style) * ROW_KEY_STRIDE + caption,
                        max_new_tokens=min(plan.max_new_tokens, max_text_tokens),
                    )
                )
    return rows, groups, settings


def prefill_prefix_kv(model: CaptionModel, image_tokens: torch.Tensor) -> PrefixKV:
    """Run the images' prefix positions through the decoder: (I, N, D) image tokens -> their
    keys/values, per layer (I, H, prefix_len, hd)."""
    prefix = model.prefix_embeddings(image_tokens)
    cos, sin = model.rope(torch.arange(prefix.shape[1], device=prefix.device))
    kv = PrefixKV()
    model.text_transformer(prefix, cos, sin, mask=None, kv=kv)
    return kv


def prefill_group_kv(model: CaptionModel, prefix: PrefixKV, image_index: torch.Tensor, style_ids: torch.Tensor,
                     cls_id: int) -> tuple[GroupKV, torch.Tensor]:
    """`[style] [CLS]` of each (image, style) group over its image's prefix: image_index and
    style_ids (G,) -> the groups' keys/values and their first-token logits (G, V) float32."""
    start = model.config.prefix_len
    x = model.token_embeddings(torch.stack((style_ids, torch.full_like(style_ids, cls_id)), dim=1))  # (G, 2, D)
    cos, sin = model.rope(torch.arange(start, start + 2, device=style_ids.device))
    mask = torch.ones(2, start + 2, dtype=torch.bool, device=style_ids.device)
    mask[0, -1] = False  # the style token does not see `[CLS]`
    kv = GroupKV(prefix, image_index)
    hidden = model.text_transformer(x, cos, sin, mask=mask, kv=kv)
    return kv, model.text_transformer.logits(hidden[:, -1]).float()


def symbolic_rows(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, its dim 0 marked as a symbolic size for torch.compile (one graph for every count)."""
    torch._dynamo.mark_dynamic(tensor, 0)
    return tensor


def decode_step(model: CaptionModel, cache: KVCache | SharedPrefixCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row at `cache.position`: tokens (R,) -> next-token logits (R, V) float32."""
    x = model.token_embeddings(tokens)[:, None]  # (R, 1, D)
    cos, sin = model.rope(cache.position)
    hidden = model.text_transformer(x, cos, sin, cache.decode_mask(), kv=cache)
    return model.text_transformer.logits(hidden[:, -1]).float()


def require_cpp_compiler() -> None:
    """Inductor builds a compiled CPU step's kernels with a C++ compiler: fail now, saying so, not
    at the first step (the shipped CPU image has none)."""
    import torch._inductor.config as inductor_config

    names = inductor_config.cpp.cxx if isinstance(inductor_config.cpp.cxx, (list, tuple)) else [inductor_config.cpp.cxx]
    if not any(name and shutil.which(name) for name in names):
        raise RuntimeError(f"compile_step (handler cpu_compile_decode) needs a C++ compiler for torch.compile's CPU "
                           f"kernels and found none of {[n for n in names if n]}: install one (Debian/Ubuntu: "
                           "apt-get install g++) or turn it off")


def compile_symbolic(step):
    """`step` through torch.compile with every size symbolic (`SYMBOLIC_STEP_SIZES`)."""
    from torch.fx.experimental import _config as shape_config

    compiled = torch.compile(step, dynamic=True)

    @functools.wraps(step)
    def run(*args):
        with shape_config.patch(**SYMBOLIC_STEP_SIZES):
            return compiled(*args)
    return run


def step_warmup_batches() -> list[list[CaptionPlan]]:
    """A batch of each form a compiled eager step (`compile_step`) meets: one image and several,
    one row per image and several, images with different row counts; compaction leads only to
    these. With the padding of `SharedPrefixCache(single_graph=True)` they share one graph (the
    tests check it); running them all at warm-up keeps any graph a form would need off the
    serving path."""
    default, one_row = {"seed": 0, "max_new_tokens": 2}, {"styles": ["concise"], "num_captions": 1}
    full, single = make_plan(default), make_plan({**default, **one_row})
    return [[full], [full, full], [single], [single, single], [full, single]]


def decode_select_step(model: CaptionModel, cache: KVCache, params: RowParams, state: TokenState) -> None:
    """One whole static-shape step, captured as one CUDA graph: feed each row's latest token at
    `cache.position`, then select and record the next. It reads and writes only fixed-address
    buffers and returns nothing, so replays never overwrite a tensor the caller still holds."""
    logits = decode_step(model, cache, state.last_tokens())
    select_step(logits, params, state)


def compiled_selection(params: RowParams) -> bool:
    """Whether a static step with these row parameters runs compiled: the sizes every batch of
    default-like requests has (top_k <= 64, no-repeat n-grams <= 4; `STATIC_MIN_NGRAM`)."""
    return params.candidates == MIN_CANDIDATES and params.max_ngram == STATIC_MIN_NGRAM


def encoder_batch(images: int) -> int:
    """The power-of-two batch a compiled encoder runs `images` images in."""
    return 1 << (images - 1).bit_length()


def keep_histories(final_history: torch.Tensor, origin: torch.Tensor, history: torch.Tensor) -> None:
    """Write each slot's history into its original row of `final_history` (padding: origin -1)."""
    real = origin >= 0
    final_history[origin[real]] = history[real]


def cut_at_end(ids: list[int]) -> list[int]:
    return ids[: ids.index(SEP_ID)] if SEP_ID in ids else ids


class CaptionEngine:
    def __init__(self, model: CaptionModel, vocab: Vocabulary, *, compile_encoder=False, compile_decode=False,
                 compile_prefill=False, static_shapes: bool | None = None, sync_every: int = 8,
                 dynamic_rows: bool = False, static_layout: str = "rows", compile_step: bool = False):
        self.model, self.vocab, self.config = model, vocab, model.config
        self.device = model.token_embeddings.weight.device
        self.dtype = model.token_embeddings.weight.dtype
        self.sync_every = sync_every
        if (compile_decode or compile_prefill) and has_opaque_linears(model):
            raise ValueError("compile_decode and compile_prefill take plain Linears, not oneDNN-packed or int8 ones: "
                             "load with prepack=False and no quantize (compile_step compiles the packed eager step)")
        # CUDA graphs need fixed shapes and addresses; the static path also runs (slower) in eager mode.
        self.static_shapes = compile_decode if static_shapes is None else static_shapes
        if compile_step and self.static_shapes:
            raise ValueError("compile_step compiles the eager decode step; with static shapes (compile_decode) "
                             "there is none: choose one")
        # compile_step: the eager step (shared-prefix cache, shrinking batch) through inductor,
        # the packed products kept (`model/packing.py`), every size symbolic.
        self.compile_step = compile_step
        if compile_step and self.device.type == "cpu":
            require_cpp_compiler()
        self._decode_step = compile_symbolic(decode_step) if compile_step else decode_step
        if static_layout not in LAYOUTS:
            raise ValueError(f"static_layout must be one of {STATIC_LAYOUTS}, not {static_layout!r}")
        self.layout = LAYOUTS[static_layout]  # `model/layouts.py`: placement, compaction, caches, warm-up
        if self.layout.needs_symbolic_sizes and compile_decode and not dynamic_rows:
            raise ValueError(f'static_layout="{static_layout}" compiles with symbolic sizes: pass dynamic_rows=True')
        # Compiled, the encoder sees only power-of-two batch sizes (padded), each its own static
        # graph: a batch of any size after warm-up never triggers a compilation.
        self.encoder_buckets = compile_encoder
        self.encoder = (torch.compile(model.encode_images, dynamic=False) if compile_encoder
                        else model.encode_images)
        # compile_prefill: both prefill passes through inductor (fused elementwise kernels, far
        # fewer launches than eager's ~30 per layer), image and group counts symbolic.
        self.compile_prefill = compile_prefill
        self._prefill_prefix, self._prefill_groups = prefill_prefix_kv, prefill_group_kv
        if compile_prefill:
            self._prefill_prefix = torch.compile(prefill_prefix_kv, dynamic=None)
            self._prefill_groups = torch.compile(prefill_group_kv, dynamic=None)
        self._decode_select = decode_select_step
        # dynamic_rows: the row count is a symbolic size, so one compilation per span serves every
        # row bucket, and each bucket only records its CUDA graph (a faster warm-up; kernels
        # generated for symbolic sizes). Otherwise one compilation per bucket and span.
        self.dynamic_rows = bool(compile_decode and dynamic_rows)
        if compile_decode:  # one CUDA graph per row bucket: the step and token selection together
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            if self.dynamic_rows:  # one graph per row bucket is the design, not a warning sign
                import torch._inductor.config as inductor_config

                triton = inductor_config.triton
                triton.cudagraph_dynamic_shape_warn_limit = max(triton.cudagraph_dynamic_shape_warn_limit or 0,
                                                                 self.layout.shapes * len(STATIC_SPAN_DIVISORS))
            self._decode_select = torch.compile(decode_select_step, mode="reduce-overhead", fullgraph=True,
                                                dynamic=None if self.dynamic_rows else False)
        self.last_stats: dict = {}
        cfg = self.config
        self._spans = tuple(cfg.prefix_len + 2 + cfg.max_text_tokens // divisor for divisor in STATIC_SPAN_DIVISORS)
        self._static_caches: dict[int | tuple[int, int], KVCache | ImageMajorCache] = {}
        self._static_states: dict[int, TokenState] = {}
        self._static_params: dict[int, RowParams] = {}

    @property
    def static_layout(self) -> str:
        return self.layout.name

    @classmethod
    def from_files(cls, weights, *, config=None, vocab=None, device="cpu", dtype=torch.float32,
                   quantize: str | None = None, prepack: bool | None = None, fuse: bool = True, **options):
        """Load a checkpoint into an engine.

        `fuse`: merge each block's q/k/v and feature/gate Linears (`model/fusion.py`).
        `compile_step=True` (an engine option): the eager decode step compiled, packed or int8 Linears kept.
        `quantize="int8"`: int8 weights per channel for the decoder (CPU, opt-in, `model/quantize.py`).
        `prepack`: oneDNN-packed decoder Linears (`model/packing.py`); None picks them where they
        apply (CPU, float32 or bfloat16 where oneDNN has it, not quantized, decoder not compiled).
        """
        if config is None:
            config = PRESETS["seed-full"]
        elif not isinstance(config, CaptionConfig):
            config = CaptionConfig.from_json(config)
        model = load_model(weights, config, device=torch.device(device), dtype=dtype)
        if fuse:
            fuse_projections(model)
        if quantize:
            quantize_decoder(model, quantize)
        if prepack is None:
            prepack = (prepack_available(torch.device(device), dtype) and not quantize
                       and not options.get("compile_decode") and not options.get("compile_prefill"))
        if prepack:
            prepack_decoder(model)
        return cls(model, Vocabulary(Path(vocab) if vocab else VOCAB_PATH), **options)

    @contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_stats[name] = self.last_stats.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    # -- phases -----------------------------------------------------------------------------

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> image tokens; with encoder buckets the batch is padded with copies of
        its first image up to a power of two (images are encoded independently)."""
        count = len(pixel_values)
        if self.encoder_buckets:
            pixel_values = at_least(pixel_values, encoder_batch(count))
        return self.encoder(pixel_values)[:count]

    def prefill_prefix(self, pixel_values: torch.Tensor) -> PrefixKV:
        """Encode images (normalised float32, or uint8 from `to_uint8_pixels`, normalised here on
        the model's device) and run their prefix positions through the decoder once."""
        with self._timed("encode_ms"):
            pixels = pixel_values.to(self.device)
            image_tokens = self.encode(normalize(pixels) if pixels.dtype == torch.uint8 else pixels)
        with self._timed("prefill_ms"):
            if not self.compile_prefill:
                return self._prefill_prefix(self.model, image_tokens)
            padded = symbolic_rows(at_least(image_tokens, PREFILL_MIN_BATCH))
            return self._prefill_prefix(self.model, padded).select(len(image_tokens))

    def prefill_groups(self, prefix: PrefixKV, groups: list[tuple[int, str]]) -> tuple[GroupKV, torch.Tensor]:
        """`[style] [CLS]` for each (image, style) group -> its keys/values and first-token logits (G, V)."""
        with self._timed("prefill_ms"):
            image_index = torch.tensor([image for image, _ in groups], device=self.device)
            style_ids = torch.tensor([STYLE_TOKEN_IDS[style] for _, style in groups], device=self.device)
            cls_id = self.vocab.ids["[CLS]"]
            if not self.compile_prefill:
                return self._prefill_groups(self.model, prefix, image_index, style_ids, cls_id)
            padded = [symbolic_rows(at_least(t, PREFILL_MIN_BATCH)) for t in (*prefix.keys, *prefix.values)]
            prefix = PrefixKV(padded[: len(prefix.keys)], padded[len(prefix.keys):])
            image_index, style_ids = (symbolic_rows(at_least(t, PREFILL_MIN_BATCH)) for t in (image_index, style_ids))
            kv, logits = self._prefill_groups(self.model, prefix, image_index, style_ids, cls_id)
            return kv.select(len(groups)), logits[: len(groups)]

    def _static_cache(self, key: int | tuple[int, int]) -> KVCache | ImageMajorCache:
        """The static decode cache of a bucket (`Placement.key`: rows, or images and slots per
        image), allocated once and reused (CUDA graphs are recorded against its addresses)."""
        if key not in self._static_caches:
            cache = self.layout.new_cache(key, self.config, self.dtype, self.device, self._spans)
            self._mark_rows_dynamic(*cache.buffers_by_rows())
            self._static_caches[key] = cache
        return self._static_caches[key]

    def _mark_rows_dynamic(self, *tensors: torch.Tensor) -> None:
        """With `dynamic_rows`: dimension 0 (rows) of these step inputs is a symbolic size."""
        if self.dynamic_rows:
            for tensor in tensors:
                symbolic_rows(tensor)

    def _token_state(self, rows: int, max_new: int) -> TokenState:
        """Generation state; with static shapes one per row bucket, reset in place."""
        if not self.static_shapes:
            return TokenState(rows, max_new, self.device)
        state = self._static_state(rows)
        state.reset()
        return state

    def _static_state(self, rows: int) -> TokenState:
        if rows not in self._static_states:
            self._static_states[rows] = state = TokenState(rows, self.config.max_text_tokens, self.device, static=True)
            self._mark_rows_dynamic(state.history, state.done)
        return self._static_states[rows]

    def _static_row_params(self, params: RowParams) -> RowParams:
        """`params` copied into its row bucket's fixed-address tensors, the n-gram size raised to its floor."""
        rows = len(params.temperature)
        if rows not in self._static_params:
            self._static_params[rows] = params.static_copy()
            self._mark_rows_dynamic(*self._static_params[rows].tensors())
        held = self._static_params[rows].load(params)
        held.max_ngram = max(held.max_ngram, STATIC_MIN_NGRAM)
        return held

    def _place(self, row_image: list[int]) -> Placement:
        """Slots for rows of these images: every row in order without static shapes (a compiled
        eager step: at least `SINGLE_GRAPH_MIN_SIZE`, padded), else a bucket."""
        if self.static_shapes:
            return self.layout.place(row_image)
        if self.compile_step:
            return row_major(len(row_image), (SINGLE_GRAPH_MIN_SIZE,))
        return in_order(range(len(row_image)))

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, plans: list[CaptionPlan]) -> tuple[list[Row], list[list[int]]]:
        """Token ids (without `[CLS]`, cut at `[SEP]`) for every caption row of the batch.

        With static shapes, a batch with more rows (or images) than the layout's largest shape
        runs in parts, each a run of its images that fits (`max_rows`, `max_images` in
        `model/layouts.py`): beyond the largest bucket a cache of the exact size would be
        allocated, and kept, for every new row count (a GPU's memory, 10 MB per bf16 row).
        """
        self.last_stats = {"images": 0, "rows": 0, "new_tokens": 0, "row_buckets": []}
        rows, ids, groups_before = [], [], 0
        for part in self._parts(plans):
            part_rows, part_ids = self._generate(pixel_values[part], plans[part])
            rows += [Row(r.image + part.start, r.group + groups_before, r.style) for r in part_rows]
            ids += part_ids
            groups_before += sum(len(plan.styles) for plan in plans[part])
        return rows, ids

    def _parts(self, plans: list[CaptionPlan]) -> list[slice]:
        """Consecutive runs of the batch's images that one engine call places (all of it without static shapes)."""
        if not self.static_shapes:
            return [slice(0, len(plans))]
        parts, start, rows = [], 0, 0
        for image, plan in enumerate(plans):
            if image > start and (rows + plan.num_rows > self.layout.max_rows
                                  or image - start >= self.layout.max_images):
                parts.append(slice(start, image))
                start, rows = image, 0
            rows += plan.num_rows
        return parts + [slice(start, len(plans))]

    def _generate(self, pixel_values: torch.Tensor, plans: list[CaptionPlan]) -> tuple[list[Row], list[list[int]]]:
        """`generate` for images that one call places; its figures added to `last_stats`."""
        rows, groups, settings = plan_rows(plans, self.config.max_text_tokens)
        placement = self._place([r.image for r in rows])
        self.last_stats["images"] += len(plans)
        self.last_stats["row_buckets"].append(placement.rows)
        # Padding slots (static shapes only) copy a real row but end after one token.
        row_caps = [row["max_new_tokens"] for row in settings]
        settings = [dict(settings[s], max_new_tokens=1) if pad else settings[s]
                    for s, pad in zip(placement.source, placement.padding)]
        slot_rows = [rows[s] for s in placement.source]
        row_group = torch.tensor([r.group for r in slot_rows], device=self.device)
        params = make_row_params(settings, self.config.output_size, self.device)
        max_new = max(row["max_new_tokens"] for row in settings)

        prefix = self.prefill_prefix(pixel_values)
        group_kv, group_logits = self.prefill_groups(prefix, groups)
        with self._timed("generate_ms"):
            history = self._decode(prefix, group_kv, group_logits, placement, [r.image for r in slot_rows],
                                   row_group, params, max_new)
        ids = [cut_at_end(h[1:]) for h in history.tolist()]
        # a row's new tokens: its words, plus the [SEP] that ended it unless its own cap did
        self.last_stats["rows"] += len(rows)
        self.last_stats["new_tokens"] += sum(min(len(i) + 1, cap) for i, cap in zip(ids, row_caps))
        return rows, ids

    def _decode(self, prefix, group_kv, group_logits, placement: Placement, row_image: list[int], row_group,
                params: RowParams, max_new: int):
        """Every placed row's token history (rows, max_new + 1; with static shapes
        max_text_tokens + 1), in the original row order; row_image,
        row_group and params are per slot. The first token comes from the group logits; step s
        feeds each row's token s - 1 and selects token s."""
        first_position = self.config.prefix_len + 2
        state = self._token_state(placement.rows, max_new)
        first_logits = group_logits.index_select(0, row_group)
        if self.static_shapes:
            cache = self._static_cache(placement.key)
            cache.fill(prefix, group_kv, torch.tensor(row_image, device=self.device), row_group)
            params = self._static_row_params(params)
            select_step(first_logits, params, state)
            step_once = self.static_step
        else:  # own positions: `[style] [CLS]` and every new token but the last
            cache = self.eager_cache(prefix, group_kv, row_image, row_group, 2 + max_new - 1)
            self._eager_step(cache, params, state, first_logits)
            step_once = self._eager_step
        final_history = state.history.new_empty((placement.rows - sum(placement.padding), state.history.shape[1]))
        origin = torch.tensor([-1 if pad else s for s, pad in zip(placement.source, placement.padding)],
                              device=self.device)  # the original row of each slot, -1 for padding
        for step in range(1, max_new):
            if step % self.sync_every == 0:
                active = (~state.done).nonzero()[:, 0].tolist()  # the one host synchronisation
                if not active:
                    break
                moved = self._compaction(active, cache)
                if moved is not None:
                    keep_histories(final_history, origin, state.history)
                    cache, state, params, origin = self._compact(cache, state, params, origin, moved)
                    self.last_stats["row_buckets"].append(moved.rows)
            cache.advance(first_position + step - 1)
            step_once(cache, params, state)
        keep_histories(final_history, origin, state.history)
        return final_history

    def _eager_step(self, cache: SharedPrefixCache, params: RowParams, state: TokenState, logits=None) -> None:
        """`decode_select_step` with the host-side length (shapes may shrink between steps)."""
        if logits is None:
            logits = self.step_logits(cache, state.history[:, state.length - 1])
        state.append(select_next(logits, params, state.history, state.length, state.length - 1), params)

    def eager_cache(self, prefix: PrefixKV, groups: GroupKV, row_image: list[int], row_group: torch.Tensor,
                    own_len: int) -> SharedPrefixCache:
        """The eager step's cache, padded for one graph when the step is compiled (`compile_step`)."""
        return SharedPrefixCache(prefix, groups, row_image, row_group, own_len, single_graph=self.compile_step)

    def step_logits(self, cache: SharedPrefixCache, tokens: torch.Tensor) -> torch.Tensor:
        """One eager decode step (`decode_step`; compiled with `compile_step`): tokens (R,) -> logits (R, V)."""
        return self._decode_step(self.model, cache, tokens)

    def static_step(self, cache: KVCache, params: RowParams, state: TokenState) -> None:
        """One static-shape step: `decode_select_step`, a CUDA-graph replay when compiled.

        The compiled step serves the selection sizes of default-like requests (`compiled_selection`);
        a batch needing more candidates or longer n-grams steps uncompiled (slower steps, but no
        compilation stalling the worker mid-traffic, and no graphs without bound for the sizes
        clients can ask for)."""
        torch.compiler.cudagraph_mark_step_begin()  # the previous replay's buffers may be reused
        step = self._decode_select if compiled_selection(params) else decode_select_step
        step(self.model, cache, params, state)

    def _compaction(self, active: list[int], cache) -> Placement | None:
        """Where the `active` (unfinished) rows of `cache` move, or None to go on as they are.

        Eager: shrink when that at least halves the batch (compiled, to no fewer than
        `SINGLE_GRAPH_MIN_SIZE` rows: finished ones fill up). Static: move to the smallest shape of
        the layout that holds the active rows, when it has fewer rows than the current one.
        """
        if not self.static_shapes:
            keep = max(len(active), SINGLE_GRAPH_MIN_SIZE) if self.compile_step else len(active)
            if keep > cache.rows // 2:
                return None
            running = set(active)
            finished = [row for row in range(cache.rows) if row not in running]
            return in_order(active + finished[: keep - len(active)])
        moved = self.layout.compacted(active, cache)
        return moved if moved.rows < cache.rows else None

    def _compact(self, cache, state: TokenState, params: RowParams, origin: torch.Tensor, moved: Placement):
        """Move rows as `moved` says. Eager: shrink the tensors. Static shapes: copy them (padding
        marked finished) into that bucket's own fixed-address cache, state and params (its own
        CUDA graph). Returns those and each new slot's original row (-1: padding)."""
        source = torch.tensor(moved.source, device=self.device)
        padding = torch.tensor(moved.padding, device=self.device)
        origin = origin.index_select(0, source).masked_fill(padding, -1)
        if not self.static_shapes:
            cache.select_rows(source)
            state.select(source)
            return cache, state, params.select(moved.source), origin
        smaller_cache, smaller_state = self._static_cache(moved.key), self._static_state(moved.rows)
        smaller_cache.load_rows(cache, source)
        smaller_state.load_rows(state, source, padding)
        return smaller_cache, smaller_state, self._static_row_params(params.select(moved.source)), origin

    # -- public API -------------------------------------------------------------------------

    def caption(self, pixel_values: torch.Tensor, plans: list[CaptionPlan]) -> list[dict[str, list[str]]]:
        """One dict per image, e.g. {"Concise": [...], "Narrative": [...]} for the styles asked for."""
        rows, ids = self.generate(pixel_values, plans)
        results = [{response_key(style): [] for style in plan.styles} for plan in plans]
        for row, row_ids in zip(rows, ids):
            results[row.image][response_key(row.style)].append(tidy_caption(self.vocab.decode(row_ids)))
        return results

    def static_placement(self, rows: int) -> Placement:
        """The slots of `rows` rows of default requests in the static layout."""
        return self.layout.default_placement(rows)

    def static_step_inputs(self, rows: int) -> tuple[KVCache | ImageMajorCache, RowParams, TokenState]:
        """The cache, row params and reset token state of `static_placement(rows)`, default
        requests: what `static_step` takes. The cache keeps whatever it held; a batch refills it."""
        placement = self.static_placement(rows)
        plans = [make_plan({"seed": 0})] * -(-rows // DEFAULT_ROWS_PER_IMAGE)
        settings = plan_rows(plans, self.config.max_text_tokens)[2]
        params = make_row_params([settings[s] for s in placement.source], self.config.output_size, self.device)
        return (self._static_cache(placement.key), self._static_row_params(params),
                self._token_state(placement.rows, self.config.max_text_tokens))

    @torch.inference_mode()
    def run_static_steps(self, rows: int, positions: list[int]) -> None:
        """Static steps of `static_placement(rows)` on dummy inputs (warm-up, profiling,
        benchmarks), one at each cache position of `positions`, the token state reset first."""
        cache, params, state = self.static_step_inputs(rows)
        for position in positions:
            cache.advance(position)
            self.static_step(cache, params, state)

    @torch.inference_mode()
    def warmup(self, batch_sizes=(1,), max_new_tokens: int = 8, max_rows: int | None = None) -> None:
        """Run dummy batches so that compilation and allocation happen before real traffic.

        A compiled encoder also runs every power-of-two batch up to the largest; a compiled eager
        step (`compile_step`) every batch form (`step_warmup_batches`). With static
        shapes also every row bucket up to the one holding `max_rows` caption rows (default: the
        largest batch of default requests), at every attention span: each step is compiled, run
        once and recorded (three calls), so no batch of up to `max_rows` rows records a graph
        while serving. Image-major (`static_layout="images"`): the image buckets up to the
        largest batch, of default requests (`model/layouts.py`, `warmup_rows`)."""
        size, started = self.config.image_size, time.perf_counter()
        for batch in batch_sizes:
            pixels = torch.zeros(batch, 3, size, size)
            self.generate(pixels, [make_plan({"max_new_tokens": max_new_tokens, "seed": 0})] * batch)
        if self.encoder_buckets:  # every power-of-two batch a partial batch can pad to
            for batch in range(encoder_batch(max(batch_sizes)).bit_length()):
                self.encode(torch.zeros(1 << batch, 3, size, size, device=self.device))
        logger.info("warm-up: batches of %s images done (%.1f s)", list(batch_sizes), time.perf_counter() - started)
        if self.compile_step:  # the first compiles the step's graph: a minute or more on a few cores
            forms = step_warmup_batches()
            for done, plans in enumerate(forms, 1):
                self.generate(torch.zeros(len(plans), 3, size, size), plans)
                logger.info("warm-up: compiled decode step, batch form %d of %d done (%.1f s)", done, len(forms),
                            time.perf_counter() - started)
        if not self.static_shapes:
            return
        buckets = self.layout.warmup_rows(max_rows or DEFAULT_ROWS_PER_IMAGE * max(batch_sizes), max(batch_sizes))
        for done, rows in enumerate(buckets, 1):  # compiling each can take many seconds: say how far it got
            placement = self.static_placement(rows)
            for span in self._static_cache(placement.key).spans:
                self.run_static_steps(rows, [span - 1] * 3)
            logger.info("warm-up: decode step of the %d-row bucket recorded (%d of %d, %.1f s)", placement.rows,
                        done, len(buckets), time.perf_counter() - started)
