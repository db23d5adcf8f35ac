"""The image encoder: DINOv3 ViT backbone -> PixelUnshuffle(2) -> projector -> RMSNorm.

The backbone is built from its config (never downloaded); its weights come from the seed
checkpoint under `vision_encoder.backbone.*`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from .config import PATCH_UNSHUFFLE, CaptionConfig


def build_backbone(config: CaptionConfig) -> DINOv3ViTModel:
    vision = DINOv3ViTConfig(**vars(config.vision), image_size=config.image_size)
    return DINOv3ViTModel(vision)


class VisionEncoder(nn.Module):
    def __init__(self, config: CaptionConfig):
        super().__init__()
        width = config.vision.hidden_size
        unshuffled = width * PATCH_UNSHUFFLE**2
        self.grid_size = config.grid_size
        self.num_prefix_tokens = 1 + config.vision.num_register_tokens  # CLS + registers
        self.backbone = build_backbone(config)
        self.pixel_unshuffle = nn.PixelUnshuffle(PATCH_UNSHUFFLE)
        self.proj = nn.Sequential(
            nn.LayerNorm(unshuffled),
            nn.Linear(unshuffled, config.embed_dim, bias=False),
            nn.GELU(),
            nn.Linear(config.embed_dim, config.embed_dim, bias=False),
        )
        self.norm = nn.RMSNorm(config.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, num_image_tokens, embed_dim)."""
        patches = self.backbone(pixel_values=pixel_values).last_hidden_state[:, self.num_prefix_tokens :]
        batch, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, width, self.grid_size, self.grid_size)  # (B, C, g, g)
        tokens = self.pixel_unshuffle(grid).flatten(2).transpose(1, 2)  # (B, 4C, g/2, g/2) -> (B, g²/4, 4C)
        return self.norm(self.proj(tokens))
