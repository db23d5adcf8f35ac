"""Batched next-token selection with per-row sampling parameters held in tensors.

The seed's order, every step: logits / temperature; repetition penalty over every token of
the row so far (`[CLS]` included; `s < 0 ? s * p : s / p`); forbid tokens that would
complete an n-gram already in the row; top-k (keep values >= the k-th largest); top-p (keep
the smallest set of highest-probability tokens whose cumulative probability exceeds p, the
top token always kept); sample. Temperature 0 means greedy: argmax after the penalties.

Sampling draws Gumbel noise from a counter-based hash of (seed, row key, step, token id), so
given its logits a row's tokens depend only on its own request, not on the batch it ran in.
Ties (frequent in bfloat16 logits) are decided by value and token id, never by the order
`topk` lists tied tokens in, which changes with the number of candidates gathered. Each row
gathers its own count of top candidates (`candidate_count`), whatever its batch: rows that
need different counts are selected in groups (`CandidateGroup`), so a request without a top-k
(the whole vocabulary) neither slows its batch-mates' selection nor moves their candidate cut.
With static shapes (one CUDA graph for the batch) every row gathers the batch's largest count;
there a tie with a row's k-th value that runs past its own cut can still be cut differently.
Either way, tokens tied with the k-th value beyond the gathered count are left out, where the
seed keeps every value >= the k-th: that takes a run of ties longer than the count's margin
over k (none at all for a top-k of 64 or another power of two above it), and never changes
with the batch on the eager path.

No per-row Python loop and no host synchronisation: everything is tensor ops, and only the
temperature and the top-k read every vocabulary entry; the penalty and the n-gram ban touch
just the tokens in each row's history, and the rest works on the (rows, k) candidate set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import CLS_ID, SEP_ID

# The fewest top tokens gathered for a row with a top-k: the same count for every row of the
# default styles (top-k 3, 30, 15) and requests with top_k <= 64, so those draw from the same
# candidates eager or compiled, alone or batched (a compiled step gathers the batch's largest
# count for every row). topk over 48 rows of the vocabulary: 1.5 ms for 64, 1.0 for 32 (2-core
# AVX-512 host).
MIN_CANDIDATES = 64
_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B  # < 2**27, so products of 32-bit values fit in int64
_NOISE_BITS = 23  # (bits + 0.5) / 2**23 is exact in float32 and strictly inside (0, 1)


@dataclass
class RowParams:
    """Per-row sampling parameters (all shape (R,)) and the host-side sizes they imply.

    `row_counts` (host) is each row's own candidate count. When they differ, `groups` splits the
    rows by count for `select_next`; a static copy (one graph for the batch) has neither, and
    gathers `candidates`, the largest, for every row.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    ngram: torch.Tensor
    seed: torch.Tensor
    row_key: torch.Tensor
    max_new_tokens: torch.Tensor
    candidates: int  # the largest row count: what every row gathers when there are no groups
    max_ngram: int
    row_counts: tuple[int, ...] = ()
    groups: tuple[CandidateGroup, ...] = field(default=(), init=False)

    def __post_init__(self):
        if any(count != self.candidates for count in self.row_counts):
            self.groups = tuple(self._group(count) for count in sorted(set(self.row_counts)))

    def _group(self, count: int) -> CandidateGroup:
        rows = [row for row, own in enumerate(self.row_counts) if own == count]
        index = torch.tensor(rows, device=self.temperature.device)
        members = self._with((tensor.index_select(0, index) for tensor in self.tensors()), candidates=count)
        return CandidateGroup(index, members)

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in _ROW_FIELDS]

    def _with(self, tensors, candidates: int | None = None, row_counts: tuple[int, ...] = ()) -> "RowParams":
        return RowParams(**dict(zip(_ROW_FIELDS, tensors)), candidates=candidates or self.candidates,
                         max_ngram=self.max_ngram, row_counts=row_counts)

    def select(self, rows: list[int]) -> "RowParams":
        """Only `rows` (compaction), each keeping its own candidate count."""
        index = torch.tensor(rows, device=self.temperature.device)
        row_counts = tuple(self.row_counts[row] for row in rows) if self.row_counts else ()
        return self._with((tensor.index_select(0, index) for tensor in self.tensors()),
                          candidates=max(row_counts, default=self.candidates), row_counts=row_counts)

    def static_copy(self) -> "RowParams":
        """A copy in fixed-address tensors (inputs a CUDA graph reads in place), refilled by `load`."""
        copied = [tensor.clone() for tensor in self.tensors()]
        for tensor in copied:
            torch._dynamo.mark_static_address(tensor)
        return self._with(copied)

    def load(self, other: "RowParams") -> "RowParams":
        """Copy `other` (same row count) into these tensors in place."""
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)
        self.candidates, self.max_ngram = other.candidates, other.max_ngram
        return self


@dataclass
class CandidateGroup:
    """Rows of a batch that gather the same number of candidates, and their parameters."""

    rows: torch.Tensor  # (G,) row indices into the batch
    params: RowParams


_ROW_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "ngram", "seed", "row_key", "max_new_tokens")


def make_row_params(rows: list[dict], vocab_size: int, device) -> RowParams:
    """rows: one dict per row with the keys of `_ROW_FIELDS`."""
    column = {name: [row[name] for row in rows] for name in _ROW_FIELDS}
    floats = {"temperature", "top_p", "repetition_penalty"}
    tensors = {
        name: torch.tensor(values, dtype=torch.float32 if name in floats else torch.long, device=device)
        for name, values in column.items()
    }
    row_counts = tuple(candidate_count(top_k, vocab_size) for top_k in column["top_k"])
    return RowParams(**tensors, candidates=max(row_counts), max_ngram=max(column["ngram"]), row_counts=row_counts)


def candidate_count(top_k: int, vocab_size: int) -> int:
    """Top tokens a row gathers: its top-k rounded up to a power of two, at least
    `MIN_CANDIDATES` (a handful of distinct sizes, so compiled graphs are reused), or the whole
    vocabulary without a top-k."""
    if top_k <= 0:
        return vocab_size
    return min(max(1 << (top_k - 1).bit_length(), MIN_CANDIDATES), vocab_size)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values kept in [0, 2**32) inside int64)."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MULTIPLIER) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _HASH_MULTIPLIER) & _MASK32
    return x ^ (x >> 16)


ROW_KEY_STRIDE = 64  # row key = style index * stride + caption index (captions per style <= stride)


def row_stream(seed: torch.Tensor, row_key: torch.Tensor, step) -> torch.Tensor:
    """(R,) hash state for one row at one step."""
    h = _mix32(seed & _MASK32)
    h = _mix32(h ^ ((seed >> 32) & _MASK32))
    h = _mix32(h ^ (row_key & _MASK32))
    return _mix32(h ^ (step & _MASK32))


def gumbel_noise(stream: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for each (row, token id): stream (R,), token_ids (R, K) -> (R, K)."""
    bits = _mix32(stream[:, None] ^ token_ids) >> (32 - _NOISE_BITS)
    return -torch.log(-torch.log(uniform_from_bits(bits)))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 2**_NOISE_BITS) -> floats strictly inside (0, 1): the noise stays finite."""
    return (bits.float() + 0.5) / float(1 << _NOISE_BITS)


def _written(history: torch.Tensor, length) -> torch.Tensor:
    """(R, Hmax) True at the history positions written so far (the first `length`)."""
    return torch.arange(history.shape[1], device=history.device)[None, :] < length


def penalise_repeats_(scores: torch.Tensor, history: torch.Tensor, length, penalty: torch.Tensor) -> torch.Tensor:
    """The repetition penalty on every token of each row's history, in place on `scores` (R, V).

    Only the (R, Hmax) entries the history names are read and written, not the whole
    vocabulary. Positions not yet written name the row's first token (`[CLS]`, always in the
    history), so a token listed twice gets the same value from each write.
    """
    ids = torch.where(_written(history, length), history, history[:, :1])
    values = scores.gather(1, ids)
    p = penalty[:, None]
    return scores.scatter_(1, ids, torch.where(values < 0, values * p, values / p))


def _column(history: torch.Tensor, index) -> torch.Tensor:
    """history[:, index] as (R, 1); `index` a host int or a 0-d device tensor (clamped at 0)."""
    if isinstance(index, int):
        return history[:, max(index, 0), None]
    return history.gather(1, index.clamp(min=0).view(1, 1).expand(history.shape[0], 1))


def repeated_ngram_positions(history: torch.Tensor, length, ngram: torch.Tensor, max_ngram: int) -> torch.Tensor:
    """(R, Hmax) True at each history position q whose token would complete an n-gram that
    already occurs in the row: the n-1 tokens before q equal the row's last n-1 tokens.

    history (R, Hmax) holds each row's tokens, `length` of them valid.
    """
    hmax = history.shape[1]
    q = torch.arange(hmax, device=history.device)[None, :]
    n = ngram[:, None]
    match = _written(history, length) & (q >= n - 1) & (n > 0)
    for back in range(1, max_ngram):
        before_q = F.pad(history, (back, 0), value=-1)[:, :hmax]  # history[q - back]
        last = _column(history, length - back)  # (R, 1): the row's back-th last token
        match &= (before_q == last) | (back > n - 1)
    return match


def ban_repeated_ngrams_(scores: torch.Tensor, history: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """-inf, in place, for the token at every `match` position of the history. A minimum over
    what each position writes (-inf where it matches, +inf, no change, elsewhere), so a token
    named by several positions is banned whatever order the writes land in."""
    bans = torch.full(match.shape, float("inf"), dtype=scores.dtype, device=scores.device)
    return scores.scatter_reduce_(1, history, bans.masked_fill(match, float("-inf")), "amin")


def keep_top_k_top_p(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """values (R, K) sorted descending -> (R, K) mask of candidates kept by top-k then top-p.

    Ties: top-k keeps every candidate equal to the k-th value (the seed's `>= kth`); top-p
    gives each run of equal values the mass before its first member, so a run at the nucleus
    boundary is kept whole. (The seed keeps whichever members its unstable sort put first;
    `topk`'s order among ties changes with K, the batch's candidate count, so a positional rule
    made a sampled row depend on its batch whenever bfloat16 logits tied there.)"""
    k = values.shape[1]
    kth = values.gather(1, (top_k.clamp(1, k) - 1)[:, None])
    keep = (top_k[:, None] <= 0) | (values >= kth)
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = F.pad(probs.cumsum(-1)[:, :-1], (1, 0)).gather(1, tie_run_starts(values))
    nucleus = (top_p > 0) & (top_p < 1)
    return keep & (~nucleus[:, None] | (mass_before <= top_p[:, None]))


def tie_run_starts(values: torch.Tensor) -> torch.Tensor:
    """values (R, K) sorted descending -> (R, K) the position of the first value equal to each."""
    position = torch.arange(values.shape[1], device=values.device).expand_as(values)
    starts_run = F.pad(values[:, 1:] != values[:, :-1], (1, 0), value=True)
    return torch.where(starts_run, position, 0).cummax(-1).values


def select_next(logits, params: RowParams, history, length, step) -> torch.Tensor:
    """One step of token selection for every row: logits (R, V) float32 -> tokens (R,).

    `length` (valid history entries) and `step` are host ints, or 0-d device tensors inside a
    captured graph. Besides the division by the temperature and the top-k, nothing here
    touches every vocabulary entry: the penalty and the n-gram ban write only the tokens the
    history names.
    """
    greedy = params.temperature == 0
    scaled = logits / torch.where(greedy, 1.0, params.temperature)[:, None]  # a new tensor: changed in place below
    penalise_repeats_(scaled, history, length, params.repetition_penalty)
    if params.max_ngram > 0:
        ban_repeated_ngrams_(scaled, history, repeated_ngram_positions(history, length, params.ngram, params.max_ngram))
    if not params.groups:  # one candidate count for every row
        return choose_among_top(scaled, params, step)
    tokens = torch.empty(len(scaled), dtype=torch.long, device=scaled.device)
    for group in params.groups:  # e.g. a row without a top-k sorts its whole vocabulary, the others 64
        tokens.index_copy_(0, group.rows, choose_among_top(scaled.index_select(0, group.rows), group.params, step))
    return tokens


def choose_among_top(scaled: torch.Tensor, params: RowParams, step) -> torch.Tensor:
    """scores (R, V) after the penalties -> tokens (R,): greedy, or sampled from the
    `params.candidates` best after top-k and top-p."""
    values, token_ids = scaled.topk(params.candidates, dim=-1)
    keep = keep_top_k_top_p(values, params.top_k, params.top_p)
    noise = gumbel_noise(row_stream(params.seed, params.row_key, step), token_ids)
    sampled = token_ids.gather(1, torch.where(keep, values + noise, float("-inf")).argmax(-1, keepdim=True))[:, 0]
    return torch.where(params.temperature == 0, lowest_id_of_the_best(values, token_ids), sampled)


def lowest_id_of_the_best(values: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Greedy choice among candidates (R, K) sorted descending: of the tokens tied for the best
    value, the lowest id, as `argmax` over the whole vocabulary picks (the seed's greedy), and
    not whichever `topk` happened to list first: its order among ties depends on K, so the
    batch's candidate count would decide ties (common in bfloat16 logits)."""
    return torch.where(values == values[:, :1], token_ids, torch.iinfo(token_ids.dtype).max).amin(-1)


class TokenState:
    """Per-row generation state in preallocated tensors: token history and finished flags.

    `length` (valid history entries, the same for every row) is kept twice: as a host int for
    the eager loop, and as a 0-d device tensor for the captured step, which must not depend on
    host values. With `static` the buffers keep fixed addresses for CUDA graphs and are reset
    in place for every batch.
    """

    def __init__(self, rows: int, max_new_tokens: int, device, static: bool = False):
        self.history = torch.empty((rows, max_new_tokens + 1), dtype=torch.long, device=device)
        self.done = torch.empty(rows, dtype=torch.bool, device=device)
        self.length_t = torch.empty((), dtype=torch.long, device=device)
        if static:
            for buffer in (self.history, self.done, self.length_t):
                torch._dynamo.mark_static_address(buffer)
        self.reset()

    def reset(self) -> None:
        self.history.fill_(SEP_ID)
        self.history[:, 0] = CLS_ID
        self.done.zero_()
        self.length_t.fill_(1)
        self.length = 1

    def append(self, tokens: torch.Tensor, params: RowParams) -> torch.Tensor:
        """Record the step's tokens (finished rows get `[SEP]`); returns what was recorded."""
        tokens = torch.where(self.done, SEP_ID, tokens)
        self.history[:, self.length] = tokens
        self.done |= (tokens == SEP_ID) | (params.max_new_tokens <= self.length)
        self.length += 1
        self.length_t.add_(1)
        return tokens

    def last_tokens(self) -> torch.Tensor:
        """(R,) each row's latest recorded token, read at the device-side length (capturable)."""
        return _column(self.history, self.length_t - 1)[:, 0]

    def record(self, tokens: torch.Tensor, params: RowParams) -> torch.Tensor:
        """`append` with the device-side length only (for the captured step)."""
        tokens = torch.where(self.done, SEP_ID, tokens)
        self.history.index_copy_(1, self.length_t.view(1), tokens[:, None])
        self.done |= (tokens == SEP_ID) | (params.max_new_tokens <= self.length_t)
        self.length_t.add_(1)
        return tokens

    def load_rows(self, other: "TokenState", rows: torch.Tensor, padding: torch.Tensor) -> None:
        """Copy `other`'s `rows` in place; rows where `padding` (bool, per row) is set are marked done."""
        self.history.copy_(other.history.index_select(0, rows))
        self.done.copy_(other.done.index_select(0, rows) | padding)
        self.length_t.copy_(other.length_t)
        self.length = other.length

    def select(self, rows: torch.Tensor) -> None:
        self.history = self.history.index_select(0, rows)
        self.done = self.done.index_select(0, rows)


def select_step(logits: torch.Tensor, params: RowParams, state: TokenState) -> torch.Tensor:
    """Select and record one token per row using only device-side counters (capturable)."""
    tokens = select_next(logits, params, state.history, state.length_t, state.length_t - 1)
    return state.record(tokens, params)
