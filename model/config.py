"""Model configuration: one dataclass for the caption model, its named presets, and JSON I/O.

The JSON form is the seed's: ``embed_dim, num_heads, depth, image_size, max_text_tokens,
vision{DINOv3ViTConfig kwargs}`` (see ``../shared/fixtures/seed-tiny/config.json``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# Tokenizer facts of the seed (BERT-uncased vocabulary + five added special tokens).
BASE_VOCAB_SIZE = 30522
SPECIAL_TOKENS = ("[IMG_START]", "[IMG_END]", "[DESCRIPTIVE]", "[NARRATIVE]", "[CONCISE]")
PAD_ID, CLS_ID, SEP_ID = 0, 101, 102
IMG_START_ID, IMG_END_ID = BASE_VOCAB_SIZE, BASE_VOCAB_SIZE + 1
STYLE_TOKEN_IDS = {"descriptive": BASE_VOCAB_SIZE + 2, "narrative": BASE_VOCAB_SIZE + 3, "concise": BASE_VOCAB_SIZE + 4}

# The projector folds each 2x2 block of patch tokens into one image token (PixelUnshuffle(2)).
PATCH_UNSHUFFLE = 2


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    num_register_tokens: int = 4
    use_gated_mlp: bool = True
    hidden_act: str = "silu"
    patch_size: int = 16


@dataclass(frozen=True)
class CaptionConfig:
    embed_dim: int = 768
    num_heads: int = 12
    depth: int = 12
    image_size: int = 384
    max_text_tokens: int = 128
    vision: VisionConfig = field(default_factory=VisionConfig)
    ffn_multiplier: int = 3
    rope_base: float = 10000.0
    # The seed cast its whole model, RoPE tables included, to bfloat16 after building it, so
    # the trained weights expect cos/sin rounded to bfloat16 (the golden logits need it too).
    rope_table_dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def vocab_size(self) -> int:
        """Rows of the token table: base vocabulary plus the added special tokens."""
        return BASE_VOCAB_SIZE + len(SPECIAL_TOKENS)

    @property
    def output_size(self) -> int:
        """The output layer predicts only base-vocabulary tokens."""
        return BASE_VOCAB_SIZE

    @property
    def grid_size(self) -> int:
        return self.image_size // self.vision.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Projected image tokens after PixelUnshuffle(2)."""
        return (self.grid_size // PATCH_UNSHUFFLE) ** 2

    @property
    def prefix_len(self) -> int:
        """`[IMG_START]` + image tokens + `[IMG_END]`: the positions shared by every style."""
        return self.num_image_tokens + 2

    @property
    def max_seq_len(self) -> int:
        """Prefix, style token, `[CLS]` and up to `max_text_tokens` generated tokens."""
        return self.prefix_len + 2 + self.max_text_tokens

    @classmethod
    def from_dict(cls, raw: dict) -> "CaptionConfig":
        """A config from its JSON form; a field of the wrong type, or sizes that cannot fit together
        (e.g. an image size the patch grid does not divide), is a ValueError naming it."""
        _check_fields(cls, raw, "model config")
        vision = raw.get("vision", {})
        _check_fields(VisionConfig, vision, "model config vision")
        config = cls(**{**raw, "vision": VisionConfig(**vision)})
        _check_types(config.vision, "model config vision")
        _check_types(config, "model config")
        _check_sizes(config)
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "CaptionConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check_fields(kind: type, raw, what: str) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - {f.name for f in dataclasses.fields(kind)}
    if unknown:
        raise ValueError(f"unknown {what} fields: {sorted(unknown)}")


def _check_types(config, what: str) -> None:
    for item in dataclasses.fields(config):
        value, kind = getattr(config, item.name), item.type
        if kind in ("int", "float", "bool", "str"):
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[kind]
            if isinstance(value, bool) != (kind == "bool") or not isinstance(value, expected):
                raise ValueError(f"{what} field {item.name!r} must be a JSON {kind}, got {value!r}")
            if kind in ("int", "float") and value <= 0:
                raise ValueError(f"{what} field {item.name!r} must be positive, got {value!r}")


def _check_sizes(config: CaptionConfig) -> None:
    vision, problems = config.vision, []
    if config.embed_dim % config.num_heads or config.head_dim % 2:
        problems.append(f"embed_dim {config.embed_dim} must split into num_heads {config.num_heads} heads of an "
                        "even size (RoPE rotates pairs)")
    if vision.hidden_size % vision.num_attention_heads:
        problems.append(f"vision hidden_size {vision.hidden_size} must divide by its "
                        f"num_attention_heads {vision.num_attention_heads}")
    if config.image_size % (vision.patch_size * PATCH_UNSHUFFLE):
        problems.append(f"image_size {config.image_size} must be a multiple of {vision.patch_size * PATCH_UNSHUFFLE} "
                        f"(patch_size {vision.patch_size} x the projector's {PATCH_UNSHUFFLE}x{PATCH_UNSHUFFLE} fold)")
    if config.rope_table_dtype not in ("bfloat16", "float16", "float32"):
        problems.append(f"rope_table_dtype must be bfloat16, float16 or float32, not {config.rope_table_dtype!r}")
    if problems:
        raise ValueError("model config: " + "; ".join(problems))


PRESETS = {
    "seed-full": CaptionConfig(),
    "seed-tiny": CaptionConfig(
        embed_dim=64, num_heads=4, depth=2, image_size=64, max_text_tokens=40,
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    ),
}
