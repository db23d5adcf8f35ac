"""The slow, obviously correct reference: no cache, one caption at a time, the seed's loops.

Every step recomputes the whole sequence `[IMG_START] image [IMG_END] [style] [CLS] text...`
under the seed's prefix-LM mask and applies the seed's per-row token processing written out
plainly. Sampling uses the same counter-based Gumbel noise as the engine, so the engine
must reproduce this path token for token, greedy or sampled.
"""

from __future__ import annotations

import torch

from .captioner import CaptionModel, prefix_lm_mask
from .config import CLS_ID, SEP_ID, STYLE_TOKEN_IDS
from .sampling import gumbel_noise, row_stream
from .styles import SamplingParams


def sequence_logits(model: CaptionModel, pixel_values, style_ids, input_ids) -> torch.Tensor:
    """Logits at every text position (`[CLS]` onwards): (B, 3, S, S), (B,), (B, L) -> (B, L, V)."""
    prefix = model.prefix_embeddings(model.encode_images(pixel_values))
    x = torch.cat((prefix, model.token_embeddings(style_ids)[:, None], model.token_embeddings(input_ids)), dim=1)
    length = x.shape[1]
    cos, sin = model.rope(torch.arange(length, device=x.device))
    mask = prefix_lm_mask(model.config.prefix_len, length, x.device)
    hidden = model.text_transformer(x, cos, sin, mask=mask)
    return model.text_transformer.logits(hidden[:, model.config.prefix_len + 1 :]).float()


def next_token(logits: torch.Tensor, tokens: list[int], params: SamplingParams, seed: int, row_key: int, step: int) -> int:
    """The seed's processing of one row's logits (V,), in its order."""
    logits = logits.clone()
    if params.temperature > 0:
        logits /= params.temperature
    for token in set(tokens):
        score = logits[token]
        logits[token] = score * params.repetition_penalty if score < 0 else score / params.repetition_penalty
    n = params.no_repeat_ngram_size
    if n > 0:
        tail = tokens[len(tokens) - (n - 1):] if n > 1 else []
        for start in range(len(tokens) - n + 1):
            if tokens[start : start + n - 1] == tail:
                logits[tokens[start + n - 1]] = float("-inf")
    if params.temperature == 0:
        return int(logits.argmax())
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    if 0 < params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cumulative > params.top_p
        remove[1:] = remove[:-1].clone()
        remove[0] = False
        logits[order[remove]] = float("-inf")
    device = logits.device
    stream = row_stream(torch.tensor([seed], device=device), torch.tensor([row_key], device=device), step)
    noise = gumbel_noise(stream, torch.arange(logits.numel(), device=device)[None])[0]
    return int((logits + noise).argmax())


@torch.inference_mode()
def generate_caption(model: CaptionModel, pixel_values, style: str, params: SamplingParams, *,
                     max_new_tokens: int = 128, seed: int = 0, row_key: int = 0) -> list[int]:
    """One caption's token ids (without `[CLS]`, cut at `[SEP]`) for one image (3, S, S)."""
    tokens = [CLS_ID]
    max_new_tokens = min(max_new_tokens, model.config.max_text_tokens)
    device = pixel_values.device
    style_ids = torch.tensor([STYLE_TOKEN_IDS[style]], device=device)
    for step in range(max_new_tokens):
        logits = sequence_logits(model, pixel_values[None], style_ids, torch.tensor([tokens], device=device))[0, -1]
        token = next_token(logits, tokens, params, seed, row_key, step)
        if token == SEP_ID:
            break
        tokens.append(token)
    return tokens[1:]
