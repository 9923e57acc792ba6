"""Shared fixtures: tiny backbones of every supported architecture, built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
import transformers

import peft_any2point  # noqa: F401  (registers the method with peft)
from peft_any2point import Any2PointConfig


torch.set_num_threads(2)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}

# name -> (factory of a tiny randomly initialised backbone, layout the projection should resolve to)
BACKBONES = {
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(**TINY)), "1d"),
    "roberta": (lambda: transformers.RobertaModel(transformers.RobertaConfig(**TINY)), "1d"),
    "clip_text": (lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY)), "1d"),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**TINY, image_size=32, patch_size=8)), "2d"),
    "dinov2": (
        lambda: transformers.Dinov2Model(
            transformers.Dinov2Config(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
            )
        ),
        "2d",
    ),
    "clip_vision": (
        lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY, image_size=32, patch_size=8)),
        "2d",
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


@pytest.fixture
def points() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 64, 3, generator=generator) * 2 - 1
