"""Position encodings of audio and rotary backbones, each checked against an independent computation."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model
from transformers.models.whisper.modeling_whisper import sinusoids

from peft_any2point.backbones import full_attention_mask, resolve_backbone, rotary_position_embeddings, run_block
from peft_any2point.projection import interpolate_table_1d, interpolate_table_2d, project_1d, sinusoidal_table
from tests.conftest import make_backbone, tiny_config


def capture_block_kwargs(blocks: torch.nn.ModuleList) -> list[dict[str, object]]:
    """Record the keyword arguments every block is called with."""
    seen: list[dict[str, object]] = []
    for block in blocks:
        block.register_forward_pre_hook(lambda _module, _args, kwargs: seen.append(kwargs), with_kwargs=True)
    return seen


# ----- audio ----------------------------------------------------------------------------------------------------


def test_ast_grid_rows_are_frequency_and_columns_time():
    model = make_backbone("ast")
    spec = resolve_backbone(model)
    assert spec.grid_shape == (4, 6)  # 16 mel bins / 4 = 4 frequency rows, 24 frames / 4 = 6 time columns
    assert spec.num_special_positions == 2  # class and distillation tokens
    rows, cols = spec.grid_shape

    # Independent of `get_shape`: light up one spectrogram patch and see which token the model puts it in.
    embeddings = model.embeddings
    with torch.no_grad():
        embeddings.position_embeddings.zero_()
        embeddings.patch_embeddings.projection.bias.zero_()
        for frequency, time in [(0, 5), (3, 0), (2, 4)]:
            spectrogram = torch.zeros(1, 24, 16)  # (batch, time frames, mel bins), the model's input layout
            spectrogram[0, 4 * time : 4 * time + 4, 4 * frequency : 4 * frequency + 4] = 1.0
            tokens = embeddings(spectrogram)[0]  # (2 + F*T, D)
            lit = tokens[2:].abs().sum(dim=-1).nonzero().flatten().tolist()
            assert lit == [frequency * cols + time]

    # ...and the projection samples table row 2 + f*T + t at unit coordinates (f / (F-1), t / (T-1)).
    table = torch.randn(2 + rows * cols, 8)
    for frequency, time in [(0, 5), (3, 0), (2, 4)]:
        unit = torch.tensor([[frequency / (rows - 1), time / (cols - 1)]])
        sampled = interpolate_table_2d(table[2:], spec.grid_shape, unit)
        torch.testing.assert_close(sampled[0], table[2 + frequency * cols + time])


def test_ast_cls_token_takes_slot_zero_and_projection_is_2d():
    model = make_backbone("ast")
    spec = resolve_backbone(model)
    assert spec.cls_position.data_ptr() == model.embeddings.position_embeddings.data_ptr()
    peft_model = get_peft_model(model, tiny_config())
    assert peft_model.base_model.any2point["default"].projection == "2d"
    # a task model wraps the same embeddings one level down
    classifier = transformers.ASTForAudioClassification(model.config)
    assert resolve_backbone(classifier).grid_shape == (4, 6)


@pytest.mark.parametrize("name", ["whisper_encoder", "whisper"])
def test_whisper_encoder_interpolates_its_own_sinusoids(name):
    model = make_backbone(name)
    encoder = model.get_encoder() if name == "whisper" else model
    spec = resolve_backbone(model)
    assert spec.blocks is encoder.layers  # never the decoder's blocks
    assert spec.final_norm is encoder.layer_norm and spec.input_norm is None
    assert spec.layout == "1d" and spec.num_special_positions == 0
    assert spec.position_table.data_ptr() == encoder.embed_positions.weight.data_ptr()  # a view, not a copy
    torch.testing.assert_close(spec.position_table, sinusoids(64, 32))


def test_full_whisper_model_keeps_its_decoder_out_of_the_forward(points):
    model = get_peft_model(make_backbone("whisper"), tiny_config())
    called = []
    model.base_model.model.decoder.register_forward_hook(lambda *_: called.append(True))
    model(points=points)
    assert not called


@pytest.mark.parametrize(
    ("name", "norm_before_blocks"), [("wav2vec2", True), ("hubert_stable_norm", False)], ids=["post-norm", "stable"]
)
def test_convolutional_position_encoding_falls_back_to_sinusoidal_table(name, norm_before_blocks, points):
    model = get_peft_model(make_backbone(name), tiny_config())
    tuner = model.base_model
    encoder = tuner.model.encoder
    spec = tuner.backbone_spec
    assert spec.layout == "none" and tuner.any2point["default"].projection == "1d"
    # encoder.layer_norm runs where the pre-trained blocks expect it; feature_projection.layer_norm never
    assert (spec.input_norm, spec.final_norm) == (
        (encoder.layer_norm, None) if norm_before_blocks else (None, encoder.layer_norm)
    )

    order: list[str] = []
    encoder.pos_conv_embed.register_forward_hook(lambda *_: order.append("conv position encoding"))
    encoder.layer_norm.register_forward_hook(lambda *_: order.append("encoder norm"))
    encoder.layers[0].register_forward_hook(lambda *_: order.append("block"))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(points=points).logits).all()
    # The convolutional encoding is skipped (token order means nothing for points); a post-norm encoder's norm runs
    # before the blocks, a stable-norm encoder's final norm initialises the adapter's own output norm instead.
    assert order == (["encoder norm", "block"] if norm_before_blocks else ["block"])

    # The point tokens get the 1D projection onto a 512-row sinusoidal stand-in table.
    modules = tuner.any2point["default"]
    config = tuner.peft_config["default"]
    with torch.no_grad():
        _, centres = modules.embedder(points)
        encodings, views = tuner._position_encoding(modules, config, centres)
    expected = interpolate_table_1d(sinusoidal_table(512, 32), views.unit_coords).mean(dim=1)
    torch.testing.assert_close(encodings, expected)


# ----- rotary ---------------------------------------------------------------------------------------------------


def independent_rope(positions: torch.Tensor, theta: float, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) (B, S, head_dim) where frequency j turns by the position in view j mod V, from scratch."""
    num_views = positions.shape[1]
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim / 2,)
    view = torch.arange(head_dim // 2) % num_views
    angles = positions.double()[:, view, :].transpose(1, 2) * inv_freq  # (B, S, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "modernbert"])
def test_rotary_cos_sin_fed_to_blocks_are_rope_at_fractional_virtual_positions(name, points):
    model = get_peft_model(make_backbone(name), tiny_config(num_views=3)).eval()
    tuner = model.base_model
    spec = tuner.backbone_spec
    assert tuner.any2point["default"].projection == "rotary"
    fed = capture_block_kwargs(spec.blocks)
    with torch.no_grad():
        model(points=points)
        _, centres = tuner.any2point["default"].embedder(points)
    unit = project_1d(centres, 3, 16).unit_coords[..., 0]  # (B, V, T)
    positions = torch.nn.functional.pad(unit * 127, (1, 0))  # L = 128 positions; the class token at 0
    assert positions.min() >= 0 and positions.max() <= 127 and positions[..., 1:].frac().abs().sum() > 0

    config = tuner.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for index, kwargs in enumerate(fed):
        parameters = config.rope_parameters
        if spec.rotary_layer_types is not None:  # ModernBERT: a global and a local theta
            parameters = parameters[spec.rotary_layer_types[index]]
        cos, sin = independent_rope(positions, parameters["rope_theta"], head_dim)
        torch.testing.assert_close(kwargs["position_embeddings"][0], cos, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kwargs["position_embeddings"][1], sin, rtol=1e-4, atol=1e-4)
        assert torch.equal(kwargs["position_embeddings"][0][:, 0], torch.ones(3, head_dim))  # class token: identity


def test_modernbert_global_and_local_layers_get_their_own_rotary_theta(points):
    model = get_peft_model(make_backbone("modernbert"), tiny_config()).eval()
    spec = model.base_model.backbone_spec
    assert spec.rotary_layer_types == ("full_attention", "sliding_attention")
    fed = capture_block_kwargs(spec.blocks)
    with torch.no_grad():
        model(points=points)
    global_cos, local_cos = (kwargs["position_embeddings"][0] for kwargs in fed)
    assert not torch.allclose(global_cos, local_cos)  # theta 160000 vs 10000
    assert all(kwargs["attention_mask"] is None for kwargs in fed)  # no window: every point token is visible


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "modernbert"])
def test_point_tokens_attend_both_ways(name, attention):
    backbone = make_backbone(name)
    backbone.set_attn_implementation(attention)
    spec = resolve_backbone(backbone)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 12, 32, generator=generator)  # 12 tokens: farther apart than Mistral's window of 8
    changed = hidden.clone()
    changed[:, -1] = torch.randn(32, generator=generator)  # not a constant shift, which a LayerNorm would undo
    positions = torch.linspace(0, 127, 12).view(1, 1, 12)
    for index, block in enumerate(spec.blocks):
        layer_type = spec.rotary_layer_types[index] if spec.rotary_layer_types else None
        rope = rotary_position_embeddings(spec, positions, hidden, layer_type)
        mask = full_attention_mask(spec, hidden)
        with torch.no_grad():
            first = run_block(block, hidden, mask, position_embeddings=rope)[:, 0]
            again = run_block(block, changed, mask, position_embeddings=rope)[:, 0]
            default = run_block(block, hidden, None, position_embeddings=rope)[:, 0]
            default_again = run_block(block, changed, None, position_embeddings=rope)[:, 0]
        assert not torch.allclose(first, again), "token 0 does not see the last token"
        if attention == "sdpa":  # sdpa attends causally when a decoder gives it no mask: the mask is what opens it
            assert torch.equal(default, default_again) == spec.causal_attention


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_class_token_of_a_decoder_sees_the_points(attention, points):
    backbone = make_backbone("llama")
    backbone.set_attn_implementation(attention)
    model = get_peft_model(backbone, tiny_config(use_adapter=False)).eval()
    outputs = []
    model.base_model.backbone_spec.blocks[-1].register_forward_hook(lambda _m, _a, out: outputs.append(out))
    with torch.no_grad():
        model(points=points)
    cls_states = outputs[0][:, 0]  # (B, D): under causal attention identical for every cloud
    assert not torch.allclose(cls_states[0], cls_states[1])


def test_rotary_ablations_and_limits(points):
    model = get_peft_model(make_backbone("llama"), tiny_config(projection="none")).eval()
    fed = capture_block_kwargs(model.base_model.backbone_spec.blocks)
    with torch.no_grad():
        assert torch.isfinite(model(points=points).logits).all()
    assert torch.equal(fed[0]["position_embeddings"][0], torch.ones_like(fed[0]["position_embeddings"][0]))
    with pytest.raises(ValueError, match="num_virtual_positions=256 exceeds the backbone's 128 positions"):
        get_peft_model(make_backbone("llama"), tiny_config(num_virtual_positions=256))(points=points)
    with pytest.raises(ValueError, match="projection='rotary' needs a rotary-position backbone; BertModel"):
        get_peft_model(make_backbone("bert"), tiny_config(projection="rotary"))
