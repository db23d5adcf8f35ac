"""Batched next-token selection with per-row sampling parameters held in tensors.

The seed's order, every step: logits / temperature; repetition penalty over every token of
the row so far (`[CLS]` included; `s < 0 ? s * p : s / p`); forbid tokens that would
complete an n-gram already in the row; top-k (keep values >= the k-th largest); top-p (keep
the smallest set of highest-probability tokens whose cumulative probability exceeds p, the
top token always kept); sample. Temperature 0 means greedy: argmax after the penalties.

Sampling draws Gumbel noise from a counter-based hash of (seed, row key, step, token id), so
a row's tokens depend only on its own request, never on the batch it ran in. No per-row
Python loop and no host synchronisation: everything is tensor ops over (rows, vocab) or
over the (rows, k) candidate set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import CLS_ID, SEP_ID

_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B  # < 2**27, so products of 32-bit values fit in int64
_NOISE_BITS = 23  # (bits + 0.5) / 2**23 is exact in float32 and strictly inside (0, 1)


@dataclass
class RowParams:
    """Per-row sampling parameters (all shape (R,)) and the host-side sizes they imply."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    ngram: torch.Tensor
    seed: torch.Tensor
    row_key: torch.Tensor
    max_new_tokens: torch.Tensor
    candidates: int  # how many top tokens to consider: max top_k, or the whole vocabulary
    max_ngram: int

    def select(self, rows: torch.Tensor) -> "RowParams":
        picked = {name: getattr(self, name).index_select(0, rows) for name in _ROW_FIELDS}
        return RowParams(**picked, candidates=self.candidates, max_ngram=self.max_ngram)


_ROW_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "ngram", "seed", "row_key", "max_new_tokens")


def make_row_params(rows: list[dict], vocab_size: int, device) -> RowParams:
    """rows: one dict per row with the keys of `_ROW_FIELDS`."""
    column = {name: [row[name] for row in rows] for name in _ROW_FIELDS}
    floats = {"temperature", "top_p", "repetition_penalty"}
    tensors = {
        name: torch.tensor(values, dtype=torch.float32 if name in floats else torch.long, device=device)
        for name, values in column.items()
    }
    top_k = column["top_k"]
    candidates = vocab_size if any(k <= 0 or k >= vocab_size for k in top_k) else max(top_k)
    return RowParams(**tensors, candidates=candidates, max_ngram=max(column["ngram"]))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values kept in [0, 2**32) inside int64)."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MULTIPLIER) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _HASH_MULTIPLIER) & _MASK32
    return x ^ (x >> 16)


def row_stream(seed: torch.Tensor, row_key: torch.Tensor, step: int) -> torch.Tensor:
    """(R,) hash state for one row at one step."""
    h = _mix32(seed & _MASK32)
    h = _mix32(h ^ ((seed >> 32) & _MASK32))
    h = _mix32(h ^ (row_key & _MASK32))
    return _mix32(h ^ (step & _MASK32))


def gumbel_noise(stream: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for each (row, token id): stream (R,), token_ids (R, K) -> (R, K)."""
    bits = _mix32(stream[:, None] ^ token_ids) >> (32 - _NOISE_BITS)
    uniform = (bits.float() + 0.5) / float(1 << _NOISE_BITS)
    return -torch.log(-torch.log(uniform))


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def repeated_ngram_mask(history: torch.Tensor, length: int, ngram: torch.Tensor, max_ngram: int, vocab_size: int):
    """(R, V) True where a token would complete an n-gram that already occurs in the row.

    history (R, Hmax) holds each row's tokens, `length` of them valid. Position q of the
    history is banned-next when the n-1 tokens before q equal the row's last n-1 tokens.
    """
    rows, hmax = history.shape
    q = torch.arange(hmax, device=history.device)[None, :]
    n = ngram[:, None]
    match = (q < length) & (q >= n - 1) & (n > 0)
    for back in range(1, max_ngram):
        before_q = F.pad(history, (back, 0), value=-1)[:, :hmax]  # history[q - back]
        last = history[:, max(length - back, 0), None]  # (R, 1): the row's back-th last token
        match &= (before_q == last) | (back > n - 1)
    banned_ids = torch.where(match, history, vocab_size)
    banned = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=history.device)
    return banned.scatter_(1, banned_ids, True)[:, :vocab_size]


def keep_top_k_top_p(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """values (R, K) sorted descending -> (R, K) mask of candidates kept by top-k then top-p."""
    k = values.shape[1]
    kth = values.gather(1, (top_k.clamp(1, k) - 1)[:, None])
    keep = (top_k[:, None] <= 0) | (values >= kth)
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = F.pad(probs.cumsum(-1)[:, :-1], (1, 0))
    nucleus = (top_p > 0) & (top_p < 1)
    return keep & (~nucleus[:, None] | (mass_before <= top_p[:, None]))


def select_next(logits, params: RowParams, history, length: int, seen, step: int) -> torch.Tensor:
    """One step of token selection for every row: logits (R, V) float32 -> tokens (R,)."""
    greedy = params.temperature == 0
    scaled = logits / torch.where(greedy, 1.0, params.temperature)[:, None]
    scaled = penalise_repeats(scaled, seen, params.repetition_penalty)
    if params.max_ngram > 0:
        banned = repeated_ngram_mask(history, length, params.ngram, params.max_ngram, logits.shape[1])
        scaled = scaled.masked_fill(banned, float("-inf"))
    values, token_ids = scaled.topk(params.candidates, dim=-1)
    keep = keep_top_k_top_p(values, params.top_k, params.top_p)
    noise = gumbel_noise(row_stream(params.seed, params.row_key, step), token_ids)
    sampled = token_ids.gather(1, torch.where(keep, values + noise, float("-inf")).argmax(-1, keepdim=True))[:, 0]
    return torch.where(greedy, token_ids[:, 0], sampled)


class TokenState:
    """Per-row generation state in preallocated tensors: history, seen-token set, finished flags."""

    def __init__(self, rows: int, max_new_tokens: int, vocab_size: int, device):
        self.history = torch.full((rows, max_new_tokens + 1), SEP_ID, dtype=torch.long, device=device)
        self.history[:, 0] = CLS_ID
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        self.seen[:, CLS_ID] = True
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.length = 1  # valid history entries (the same for every row)

    def append(self, tokens: torch.Tensor, params: RowParams) -> torch.Tensor:
        """Record the step's tokens (finished rows get `[SEP]`); returns what was recorded."""
        tokens = torch.where(self.done, SEP_ID, tokens)
        self.history[:, self.length] = tokens
        self.seen.scatter_(1, tokens[:, None], True)
        self.done |= (tokens == SEP_ID) | (params.max_new_tokens <= self.length)
        self.length += 1
        return tokens

    def select(self, rows: torch.Tensor) -> None:
        self.history = self.history.index_select(0, rows)
        self.seen = self.seen.index_select(0, rows)
        self.done = self.done.index_select(0, rows)
