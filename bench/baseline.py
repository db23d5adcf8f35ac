"""The straightforward baseline: the seed's generation algorithm on this project's modules.

What the original server did for one image: expand the image to one row per caption, run the
vision encoder and the whole prefill for every row, grow each layer's keys/values with
`torch.cat` every step, and pick every row's next token in a Python loop (n-gram scan over a
`.tolist()` copy, per-row top-k and full-vocabulary sort for top-p). Requests were served one
at a time. Token selection reuses `model.reference.next_token` (the seed's per-row rules), so
the baseline and the engine choose the same tokens given the same logits.
"""

from __future__ import annotations

import torch

from model.captioner import CaptionModel, prefix_lm_mask
from model.config import CLS_ID, SEP_ID, STYLE_TOKEN_IDS
from model.engine import ROW_KEY_STRIDE
from model.kv_cache import StoreThenAttend
from model.reference import next_token
from model.styles import STYLES, CaptionPlan


class GrowingKV(StoreThenAttend):
    """The seed's cache: each step concatenates the new keys/values to the old ones."""

    def __init__(self, layers: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


@torch.inference_mode()
def baseline_caption_ids(model: CaptionModel, pixel_values: torch.Tensor, plan: CaptionPlan) -> list[list[int]]:
    """One image (3, S, S), all its caption rows at once, the seed's way."""
    rows = [(s, c) for s in plan.styles for c in range(plan.num_captions[s])]
    count, device = len(rows), pixel_values.device
    seed = plan.seed or 0
    images = pixel_values[None].expand(count, -1, -1, -1)
    styles = torch.tensor([STYLE_TOKEN_IDS[s] for s, _ in rows], device=device)
    tokens = torch.full((count, 1), CLS_ID, dtype=torch.long, device=device)
    prefix = model.prefix_embeddings(model.encode_images(images))  # the encoder runs once per row
    x = torch.cat((prefix, model.token_embeddings(styles)[:, None], model.token_embeddings(tokens)), dim=1)
    length = x.shape[1]
    kv = GrowingKV(model.config.depth)
    cos, sin = model.rope(torch.arange(length, device=device))
    hidden = model.text_transformer(x, cos, sin, mask=prefix_lm_mask(model.config.prefix_len, length, device), kv=kv)
    logits = model.text_transformer.logits(hidden[:, -1]).float()
    finished = [False] * count
    max_new = min(plan.max_new_tokens, model.config.max_text_tokens)
    for step in range(max_new):
        history = tokens.tolist()
        chosen = []
        for r, (style, caption) in enumerate(rows):
            if finished[r]:
                chosen.append(SEP_ID)
                continue
            token = next_token(logits[r], history[r], plan.sampling[style], seed, STYLES.index(style) * ROW_KEY_STRIDE + caption, step)
            finished[r] = token == SEP_ID
            chosen.append(token)
        tokens = torch.cat((tokens, torch.tensor(chosen, device=device)[:, None]), dim=1)
        if all(finished) or step == max_new - 1:
            break
        position = length + step
        cos, sin = model.rope(torch.tensor([position], device=device))
        hidden = model.text_transformer(model.token_embeddings(tokens[:, -1:]), cos, sin, kv=kv)
        logits = model.text_transformer.logits(hidden[:, -1]).float()
    out = []
    for row in tokens[:, 1:].tolist():
        out.append(row[: row.index(SEP_ID)] if SEP_ID in row else row)
    return out
