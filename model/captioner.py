"""The seed caption model: token table, vision encoder and decoder under the checkpoint's names.

`CaptionModel` holds the weights and the shared pieces (prefix embeddings, RoPE tables,
the seed's prefix-LM mask); generation lives in `model/engine.py` (fast) and
`model/reference.py` (slow, obviously correct).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import IMG_END_ID, IMG_START_ID, CaptionConfig
from .layers import DecoderTransformer, rope_tables
from .vision import VisionEncoder


def prefix_lm_mask(prefix_len: int, total_len: int, device=None) -> torch.Tensor:
    """The seed's attention mask (True = may attend), (total_len, total_len).

    The prefix positions (`[IMG_START]`, image tokens, `[IMG_END]`) attend only to each
    other, both ways; later positions attend to the whole prefix and causally to each other.
    """
    mask = torch.ones(total_len, total_len, dtype=torch.bool, device=device).tril()
    mask[:prefix_len, :prefix_len] = True
    return mask


class CaptionModel(nn.Module):
    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = nn.Embedding(config.vocab_size, config.embed_dim)
        self.vision_encoder = VisionEncoder(config)
        self.text_transformer = DecoderTransformer(config)
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        return rope_tables(config.head_dim, config.max_seq_len, config.rope_base, config.rope_table_dtype)

    def _apply(self, fn, recurse=True):
        # The RoPE tables follow the weights' device but keep their float32 values, rounded once
        # as the config says, whatever dtype the weights are cast to (a cast and back would round
        # a float32 or float16 table to the weights' dtype).
        super()._apply(fn, recurse)
        device = self.rope_cos.device
        self.rope_cos, self.rope_sin = (table.to(device) for table in self._rope_tables())
        return self

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[positions], self.rope_sin[positions]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_image_tokens, D)."""
        return self.vision_encoder(pixel_values.to(self.token_embeddings.weight.dtype))

    def prefix_embeddings(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) image tokens -> (B, prefix_len, D): `[IMG_START]`, image tokens, `[IMG_END]`.

        The two marker vectors are rows of the loaded token table (the seed copied them at
        construction time, before loading, which made its server use random vectors).
        """
        batch = image_tokens.shape[0]
        markers = self.token_embeddings.weight[[IMG_START_ID, IMG_END_ID]]
        start, end = markers[0].expand(batch, 1, -1), markers[1].expand(batch, 1, -1)
        return torch.cat((start, image_tokens, end), dim=1)
