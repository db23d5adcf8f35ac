"""Batched token selection: agreement with the seed's per-row processing, and property tests.

Every sampled token must lie inside the set the seed would allow (top-k, top-p, n-gram
ban), whatever the logits; the tensor implementation must pick exactly what the plain
per-row reference (`model/reference.py`) picks, given the same counter-based noise.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import CLS_ID
from model.reference import next_token
from model.sampling import (
    TokenState,
    gumbel_noise,
    keep_top_k_top_p,
    make_row_params,
    ban_repeated_ngrams_,
    penalise_repeats_,
    repeated_ngram_positions,
    row_stream,
    select_next,
    select_step,
)
from model.styles import SamplingParams

pytestmark = pytest.mark.unit
VOCAB = 64
STATE_VOCAB = 300  # [CLS] (101) inside

row_settings = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.0, 0.2, 0.75, 1.0, 2.0]),
        "top_k": st.sampled_from([0, 1, 3, 15, 30]),
        "top_p": st.sampled_from([0.0, 0.5, 0.75, 0.9, 1.0]),
        "repetition_penalty": st.sampled_from([1.0, 1.15, 1.4, 2.0]),
        "ngram": st.sampled_from([0, 2, 3, 4]),
        "seed": st.integers(0, 2**63 - 1),
        "row_key": st.integers(0, 200),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(row_settings, min_size=1, max_size=5),
    length=st.integers(0, 12),
    data=st.data(),
)
def test_batched_selection_equals_per_row_reference(rows, length, data):
    vocab = CLS_ID + 1 + VOCAB  # token ids 0..vocab-1, `[CLS]` inside
    tokens = [data.draw(st.lists(st.integers(95, vocab - 1), min_size=length, max_size=length)) for _ in rows]
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    logits = torch.randn(len(rows), vocab, generator=generator) * data.draw(st.sampled_from([0.5, 3.0, 10.0]))
    step = data.draw(st.integers(0, 127))
    for row in rows:
        row["max_new_tokens"] = 128
    params = make_row_params(rows, vocab, "cpu")
    state = TokenState(len(rows), length + 1, "cpu")
    for i in range(length):
        state.history[:, state.length] = torch.tensor([t[i] for t in tokens])
        state.length += 1
    chosen = select_next(logits, params, state.history, state.length, step)
    for r, row in enumerate(rows):
        sampling = SamplingParams(row["temperature"], row["top_k"], row["top_p"], row["repetition_penalty"], row["ngram"])
        expected = next_token(logits[r], [CLS_ID] + tokens[r], sampling, row["seed"], row["row_key"], step)
        assert int(chosen[r]) == expected


@settings(max_examples=40, deadline=None)
@given(row=row_settings, seed=st.integers(0, 2**31), steps=st.integers(1, 40))
def test_sampled_tokens_lie_in_the_allowed_set(row, seed, steps):
    vocab = 300
    generator = torch.Generator().manual_seed(seed)
    row = dict(row, max_new_tokens=128, temperature=max(row["temperature"], 0.2))
    params = make_row_params([row], vocab, "cpu")
    state = TokenState(1, steps + 1, "cpu")
    for step in range(steps):
        logits = torch.randn(1, vocab, generator=generator) * 4
        token = int(select_next(logits, params, state.history, state.length, step)[0])
        history = state.history[0, : state.length].tolist()
        allowed = allowed_tokens(logits[0] / row["temperature"], history, row)
        assert token in allowed
        state.history[0, state.length] = token
        state.length += 1


def allowed_tokens(scaled: torch.Tensor, history: list[int], row: dict) -> set[int]:
    """The seed's allowed set, computed independently with plain Python over sorted scores."""
    scores = scaled.tolist()
    for t in set(history):
        scores[t] = scores[t] * row["repetition_penalty"] if scores[t] < 0 else scores[t] / row["repetition_penalty"]
    n = row["ngram"]
    banned = set()
    if n > 0:
        tail = history[len(history) - (n - 1):] if n > 1 else []
        banned = {history[j + n - 1] for j in range(len(history) - n + 1) if history[j : j + n - 1] == tail}
    order = sorted((i for i in range(len(scores)) if i not in banned), key=lambda i: -scores[i])
    if row["top_k"] > 0:
        kth = scores[order[min(row["top_k"], len(order)) - 1]]
        order = [i for i in order if scores[i] >= kth]
    if 0 < row["top_p"] < 1:
        weights = torch.softmax(torch.tensor([scores[i] for i in order]), 0).tolist()
        kept, mass = [], 0.0
        for i, w in zip(order, weights):
            kept.append(i)
            mass += w
            if mass > row["top_p"] + 1e-6:
                break
        order = kept
    return set(order)


def banned_tokens(history, length, ngram, max_ngram=3, vocab=200) -> list[int]:
    scores = torch.zeros(history.shape[0], vocab)
    ban_repeated_ngrams_(scores, history, repeated_ngram_positions(history, length, torch.tensor(ngram), max_ngram))
    return [row.isinf().nonzero()[:, 0].tolist() for row in scores]


def select_with_neighbour(logits: torch.Tensor, row: dict, neighbour_top_k: int, step: int = 0) -> int:
    """Row 0's token when it shares the batch with a row whose top_k sets the candidate count."""
    neighbour = dict(temperature=1.0, top_k=neighbour_top_k, top_p=1.0, repetition_penalty=1.0, ngram=0, seed=1,
                     row_key=1, max_new_tokens=8)
    params = make_row_params([dict(row, max_new_tokens=8), neighbour], logits.shape[1], "cpu")
    state = TokenState(2, 2, "cpu")
    return int(select_next(logits, params, state.history, state.length, step)[0])


def test_a_greedy_tie_goes_to_the_lowest_token_id_whatever_the_batch():
    """bfloat16 logits tie often. `topk` lists tied tokens in an order that depends on how many
    it returns (the batch's largest top_k), so its first one made a request's greedy caption
    depend on its batch; the lowest id is what `argmax` over the vocabulary (the seed) picks."""
    greedy = dict(temperature=0.0, top_k=3, top_p=0.75, repetition_penalty=1.0, ngram=0, seed=0, row_key=0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(2, 300, generator=generator)
        tied = torch.randperm(300, generator=generator)[:3]
        logits[0, tied] = 10.0
        expected = next_token(logits[0], [CLS_ID], SamplingParams(0.0, 3, 0.75, 1.0, 0), 0, 0, 0)
        assert expected == int(tied.min())
        assert {select_with_neighbour(logits, greedy, k) for k in (3, 30, 0)} == {expected}


def test_a_tied_run_at_the_nucleus_boundary_is_kept_whole_in_any_order():
    """Tokens with equal scores share the mass before their run, so which of them top-p keeps
    does not depend on the order `topk` happened to list them in."""
    values = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])  # probabilities .45, .16, .16, .16, .06
    keep = keep_top_k_top_p(values, torch.tensor([0]), torch.tensor([0.5]))
    assert keep.tolist() == [[True, True, True, True, False]]
    sampled = dict(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=1.0, ngram=0, seed=7, row_key=0)
    logits = torch.full((2, 300), -5.0)
    logits[0, [40, 12, 250, 7]] = torch.tensor([2.0, 1.0, 1.0, 1.0])
    drawn = {k: [select_with_neighbour(logits, sampled, k, step) for step in range(30)] for k in (0, 4)}
    assert drawn[0] == drawn[4]  # 300 candidates or 64: the same tokens
    assert set(drawn[0]) == {40, 12, 250, 7}  # the whole tied run kept


def test_top_p_keeps_the_token_whose_mass_before_it_equals_p():
    """The seed keeps the smallest set whose mass *exceeds* p: a token whose predecessors sum to
    exactly p is still needed (their mass only equals p), the next one is not."""
    values = torch.tensor([[2.0, 1.0, 0.0]])
    top_p = torch.softmax(values, dim=-1)[:, 0]  # exactly the first token's mass, in float32
    keep = keep_top_k_top_p(values, torch.tensor([0]), top_p)
    assert keep.tolist() == [[True, True, False]]
    keep_below = keep_top_k_top_p(values, torch.tensor([0]), torch.nextafter(top_p, torch.tensor(0.0)))
    assert keep_below.tolist() == [[True, False, False]]


def test_a_row_gathers_its_own_candidate_count_whatever_its_batch():
    """A request without a top-k sorts the whole vocabulary; before, every row of its batch did
    (48 rows: 85 instead of 2 ms a step), and a tie with a row's k-th score that ran past the
    64th token was then cut elsewhere than alone. Rows are now selected in groups, each group
    gathering its own count."""
    sampled = dict(temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0, ngram=0, seed=7, row_key=0)
    logits = torch.full((2, STATE_VOCAB), -5.0)
    logits[0, :2] = 3.0
    logits[0, 100:200] = 1.0  # 100 tokens tied with the 3rd best
    alone = make_row_params([dict(sampled, max_new_tokens=8)], STATE_VOCAB, "cpu")
    state = TokenState(1, 2, "cpu")
    expected = [int(select_next(logits[:1], alone, state.history, state.length, step)[0]) for step in range(40)]
    assert set(expected) - {0, 1}  # the tied tokens are drawn too
    for neighbour_top_k in (0, 200, 5):
        assert [select_with_neighbour(logits, sampled, neighbour_top_k, step) for step in range(40)] == expected
    params = make_row_params([dict(sampled, max_new_tokens=8)] * 2 + [dict(sampled, top_k=0, max_new_tokens=8)],
                             STATE_VOCAB, "cpu")
    assert [(group.params.candidates, group.rows.tolist()) for group in params.groups] == [(64, [0, 1]), (300, [2])]
    kept = params.select([2, 0])  # compaction: each row keeps its own count
    assert kept.candidates == 300 and [g.rows.tolist() for g in kept.groups] == [[1], [0]]
    assert not params.select([0, 1]).groups and params.select([0, 1]).candidates == 64


def test_candidate_counts_are_a_few_powers_of_two():
    """A row's top-k rounded up to a power of two, at least 64, at most the vocabulary: few
    distinct counts, so a compiled step's graphs are reused across requests."""
    from model.sampling import MIN_CANDIDATES, candidate_count

    vocab = 30522
    assert [candidate_count(k, vocab) for k in (1, 3, 30, 64)] == [MIN_CANDIDATES] * 4
    assert [candidate_count(k, vocab) for k in (65, 100, 128, 129, 5000)] == [128, 128, 128, 256, 8192]
    assert candidate_count(20000, vocab) == candidate_count(0, vocab) == vocab  # 32768 capped; 0: no top-k


def test_the_noise_stream_depends_on_seed_row_and_step():
    """Every input of the hash moves the stream: the seed's low and high 32 bits, the row key
    and the step (a stream that ignored one would give equal captions where they must differ)."""
    seeds = torch.tensor([0, 1, 2**32, 2**32 + 1, 2**63 - 1, 0, 0])
    keys = torch.tensor([0, 0, 0, 0, 0, 1, 64])
    streams = row_stream(seeds, keys, 3)
    assert len(set(streams.tolist())) == len(seeds)
    assert not torch.equal(row_stream(seeds, keys, 4), streams)
    assert torch.equal(row_stream(seeds, keys, 3), streams)  # and nothing else does


def test_ngram_ban_matches_the_seed_rule():
    history = torch.tensor([[CLS_ID, 5, 6, 7, 5, 6, 0, 0]])
    assert banned_tokens(history, 6, [3]) == [[7]]  # last two tokens "5 6" seen before "7"
    assert banned_tokens(history, 6, [2]) == [[7]]  # "6" was followed by "7"
    assert banned_tokens(history, 6, [0]) == [[]]
    # One token named by several positions, matching at some and not others: banned
    # whatever order the writes land in ("5" follows "1" at q=2 and q=5, "3" follows "1" at q=7).
    history = torch.tensor([[CLS_ID, 1, 5, 9, 1, 5, 5, 1, 3, 1]])
    assert banned_tokens(history, 10, [2]) == [[3, 5]]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_sparse_penalty_and_ban_equal_the_dense_vocabulary_masks(data):
    """The history-only writes equal the obvious form: a (rows, vocab) mask of the tokens seen
    (or banned) and a `where` over the whole vocabulary."""
    rows, vocab, hmax = data.draw(st.integers(1, 4)), 40, 12
    length = data.draw(st.integers(1, hmax))
    history = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=hmax, max_size=hmax),
                                              min_size=rows, max_size=rows)))
    history[:, length:] = data.draw(st.integers(0, vocab - 1))  # unwritten positions: any token
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))) * 3
    penalty = torch.tensor(data.draw(st.lists(st.sampled_from([1.0, 1.15, 2.0]), min_size=rows, max_size=rows)))
    ngram = torch.tensor(data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 4]), min_size=rows, max_size=rows)))

    seen = torch.zeros(rows, vocab, dtype=torch.bool).scatter_(1, history[:, :length], True)
    p = penalty[:, None]
    expected = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
    match = repeated_ngram_positions(history, length, ngram, 4)
    banned = torch.zeros(rows, vocab + 1, dtype=torch.bool).scatter_(1, torch.where(match, history, vocab), True)
    expected = expected.masked_fill(banned[:, :vocab], float("-inf"))

    actual = ban_repeated_ngrams_(penalise_repeats_(scores.clone(), history, length, penalty), history, match)
    assert torch.equal(actual, expected)


def test_finished_rows_emit_end_tokens_and_respect_max_new_tokens():
    rows = [dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ngram=0, seed=0, row_key=0,
                 max_new_tokens=m) for m in (2, 5)]
    params = make_row_params(rows, 300, "cpu")
    state = TokenState(2, 5, "cpu")
    logits = torch.zeros(2, 300)
    logits[:, 200] = 1.0
    for _ in range(3):
        state.append(select_next(logits, params, state.history, state.length, 0), params)
    assert state.history[:, 1:4].tolist() == [[200, 200, 102], [200, 200, 200]]
    assert state.done.tolist() == [True, False]


def test_gumbel_noise_is_finite_for_every_hash_value():
    from model.sampling import _NOISE_BITS, uniform_from_bits

    extremes = torch.tensor([[0, 1, (1 << _NOISE_BITS) - 1]], dtype=torch.long)
    uniform = uniform_from_bits(extremes)
    assert bool(((uniform > 0) & (uniform < 1)).all())
    assert bool(torch.isfinite(-torch.log(-torch.log(uniform))).all())
    noise = gumbel_noise(torch.arange(1000), torch.arange(30522)[None].expand(1000, -1))
    assert bool(torch.isfinite(noise).all())


def test_captured_step_records_like_the_eager_step():
    """`select_step` (device-side length, what the CUDA graph runs) records the same tokens and
    flags as `append` (host length), and `last_tokens` reads back what was recorded."""
    rows = [dict(temperature=t, top_k=k, top_p=0.9, repetition_penalty=1.3, ngram=3, seed=s, row_key=r,
                 max_new_tokens=m) for t, k, s, r, m in ((0.0, 0, 1, 0, 3), (1.0, 5, 2, 1, 6), (0.7, 0, 3, 64, 6))]
    params = make_row_params(rows, STATE_VOCAB, "cpu")
    eager, captured = TokenState(3, 6, "cpu"), TokenState(3, 6, "cpu", static=True)
    logits = torch.randn(6, 3, STATE_VOCAB, generator=torch.Generator().manual_seed(0))
    for step in range(6):
        expected = eager.append(select_next(logits[step], params, eager.history, eager.length, step), params)
        select_step(logits[step], params, captured)
        assert torch.equal(captured.last_tokens(), expected)
    assert torch.equal(captured.history, eager.history) and torch.equal(captured.done, eager.done)
    assert int(captured.length_t) == eager.length


def test_static_row_params_keep_their_tensors_when_reloaded():
    first = make_row_params([dict(temperature=0.5, top_k=4, top_p=1.0, repetition_penalty=1.0, ngram=0, seed=1,
                                  row_key=0, max_new_tokens=8)] * 2, STATE_VOCAB, "cpu")
    second = make_row_params([dict(temperature=0.0, top_k=0, top_p=0.5, repetition_penalty=1.2, ngram=3, seed=2,
                                   row_key=5, max_new_tokens=4)] * 2, STATE_VOCAB, "cpu")
    held = first.static_copy()
    addresses = [held.temperature.data_ptr(), held.seed.data_ptr()]
    held.load(second)
    assert [held.temperature.data_ptr(), held.seed.data_ptr()] == addresses  # a CUDA graph reads them in place
    assert torch.equal(held.top_p, second.top_p) and torch.equal(held.row_key, second.row_key)
    assert (held.candidates, held.max_ngram) == (second.candidates, second.max_ngram) == (STATE_VOCAB, 3)
