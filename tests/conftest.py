"""Shared fixtures: tiny backbones of every supported architecture, built from configs (no download)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers

import peft_any2point  # noqa: F401  (registers the method with peft)
from peft_any2point import Any2PointConfig


torch.set_num_threads(2)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


class Backbone(NamedTuple):
    """A tiny randomly initialised backbone of one architecture, and what the tuner should make of it."""

    factory: Callable[[], torch.nn.Module]
    projection: str  # what projection="auto" must resolve to
    modality: str


def _whisper_config() -> transformers.WhisperConfig:
    return transformers.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=64,
        max_target_positions=16,
        num_mel_bins=8,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


# wav2vec2/HuBERT: a 2-layer convolutional feature encoder narrower than the hidden size (8 vs 32).
_SPEECH = {"conv_dim": (8, 8), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16}
_DECODER = {**TINY, "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 128}

BACKBONES: dict[str, Backbone] = {
    "bert": Backbone(lambda: transformers.BertModel(transformers.BertConfig(**TINY)), "1d", "language"),
    "roberta": Backbone(lambda: transformers.RobertaModel(transformers.RobertaConfig(**TINY)), "1d", "language"),
    "clip_text": Backbone(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY)), "1d", "language"),
    "vit": Backbone(
        lambda: transformers.ViTModel(transformers.ViTConfig(**TINY, image_size=32, patch_size=8)), "2d", "vision"
    ),
    "dinov2": Backbone(
        lambda: transformers.Dinov2Model(
            transformers.Dinov2Config(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
            )
        ),
        "2d",
        "vision",
    ),
    "clip_vision": Backbone(
        lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY, image_size=32, patch_size=8)),
        "2d",
        "vision",
    ),
    "whisper_encoder": Backbone(lambda: transformers.WhisperModel(_whisper_config()).get_encoder(), "1d", "audio"),
    "whisper": Backbone(lambda: transformers.WhisperModel(_whisper_config()), "1d", "audio"),
    "ast": Backbone(
        # 16 mel bins x 24 frames in 4x4 patches: a 4 (frequency) x 6 (time) grid, plus 2 special slots
        lambda: transformers.ASTModel(
            transformers.ASTConfig(
                **TINY, patch_size=4, num_mel_bins=16, max_length=24, frequency_stride=4, time_stride=4
            )
        ),
        "2d",
        "audio",
    ),
    "wav2vec2": Backbone(
        lambda: transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY, **_SPEECH)), "1d", "audio"
    ),
    "hubert_stable_norm": Backbone(
        lambda: transformers.HubertModel(transformers.HubertConfig(**TINY, **_SPEECH, do_stable_layer_norm=True)),
        "1d",
        "audio",
    ),
    "llama": Backbone(lambda: transformers.LlamaModel(transformers.LlamaConfig(**_DECODER)), "rotary", "language"),
    "qwen2": Backbone(lambda: transformers.Qwen2Model(transformers.Qwen2Config(**_DECODER)), "rotary", "language"),
    "mistral": Backbone(
        lambda: transformers.MistralModel(transformers.MistralConfig(**_DECODER, sliding_window=8)),
        "rotary",
        "language",
    ),
    "modernbert": Backbone(
        # layer 0 global, layer 1 local (an 8-token window), as in ModernBERT's alternation
        lambda: transformers.ModernBertModel(
            transformers.ModernBertConfig(
                **TINY,
                vocab_size=64,
                max_position_embeddings=128,
                global_attn_every_n_layers=2,
                local_attention=8,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                cls_token_id=1,
                sep_token_id=2,
            )
        ),
        "rotary",
        "language",
    ),
}


def tiny_config(**overrides: object) -> Any2PointConfig:
    """An Any2Point config small enough for fast CPU tests: 16 tokens from 2 stages, so 32+ input points."""
    values: dict[str, object] = {
        "num_labels": 5,
        "num_tokens": 16,
        "num_stages": 2,
        "stage_widths": [16, 24],
        "num_neighbors": 8,
        "point_encoding_dim": 12,
        "adapter_dim": 4,
        "head_hidden_size": 16,
    }
    values.update(overrides)
    return Any2PointConfig(**values)


def make_backbone(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BACKBONES[name][0]().eval()


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel saved like a downloaded one."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(path)
    return path


@pytest.fixture
def points() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 64, 3, generator=generator) * 2 - 1
