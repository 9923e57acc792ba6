"""The Any2Point tuner through peft's own entry points, on tiny backbones of every supported architecture."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from safetensors import SafetensorError
from safetensors.torch import load_file

from peft_any2point import Any2PointConfig, Any2PointModel
from peft_any2point.model import validate_points
from tests.conftest import BACKBONES, make_backbone, tiny_config


def attach(name: str = "bert", seed: int = 0, **overrides: object) -> PeftModel:
    return get_peft_model(make_backbone(name, seed), tiny_config(**overrides))


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


# ----- registration ---------------------------------------------------------------------------------------------


def test_import_registers_a_real_peft_method_idempotently():
    import peft_any2point.registry as registry

    registry.register()
    importlib.reload(importlib.import_module("peft_any2point"))
    assert PeftType("ANY2POINT") is PeftType.ANY2POINT
    assert list(PeftType).count(PeftType.ANY2POINT) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ANY2POINT] is Any2PointConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.ANY2POINT] is Any2PointModel
    assert Any2PointConfig().peft_type == PeftType.ANY2POINT


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="one width per stage"):
        Any2PointConfig(num_stages=2, stage_widths=[8, 8, 8])
    with pytest.raises(ValueError, match="multiple of 6"):
        Any2PointConfig(point_encoding_dim=10)
    with pytest.raises(ValueError, match=r"outlier_neighbors must be >= 0 and outlier_std_ratio > 0, got -1, 4\.0"):
        Any2PointConfig(outlier_neighbors=-1)
    with pytest.raises(ValueError, match="num_views must be between 1 and 6"):
        attach(num_views=7)(points=torch.rand(1, 64, 3))


def test_outlier_filter_round_trips_through_the_adapter_folder(tmp_path):
    points = torch.nn.functional.normalize(torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(5)), dim=-1)
    points[:, 0] *= 5
    model = attach(outlier_neighbors=6, outlier_std_ratio=2.5).eval()
    assert model.base_model.any2point["default"].embedder.outlier_std_ratio == 2.5
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_backbone("bert"), tmp_path).eval()
    config = reloaded.peft_config["default"]
    assert (config.outlier_neighbors, config.outlier_std_ratio) == (6, 2.5)
    assert torch.equal(reloaded(points=points).logits, model(points=points).logits)
    unfiltered = attach().eval()
    unfiltered.load_state_dict(model.state_dict())
    assert not torch.equal(unfiltered(points=points).logits, model(points=points).logits)


# ----- every architecture: inject, train, save, reload ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_architecture_trains_only_adapter_and_round_trips(name, points, tmp_path):
    model = attach(name)
    spec = model.base_model.backbone_spec
    assert model.base_model.any2point["default"].projection == BACKBONES[name][1]
    assert spec.num_layers == 2

    before = frozen_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".any2point.default." in n for n in trainable)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    loss = model(points=points, labels=torch.tensor([0, 1, 4])).loss
    loss.backward()
    optimizer.step()
    after = frozen_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a backbone weight changed"

    model.eval()
    with torch.no_grad():
        logits = model(points=points).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == len(trainable)
    assert all(k.startswith("base_model.any2point.") and ".default." not in k for k in saved)

    reloaded = PeftModel.from_pretrained(make_backbone(name), tmp_path)
    with torch.no_grad():
        again = reloaded(points=points).logits
    assert torch.equal(logits, again)


def test_non_point_calls_still_reach_the_original_forward():
    model = attach("bert")
    input_ids = torch.tensor([[101, 2023, 102]])
    expected = make_backbone("bert")(input_ids=input_ids).last_hidden_state
    assert torch.equal(model(input_ids=input_ids).last_hidden_state, expected)


def test_a_deep_copy_or_pickled_model_routes_points_to_its_own_adapter(points, tmp_path):
    """EMA copies and the like: a copy's point calls must reach the copy's modules, not the original's."""
    model = attach().eval()
    with torch.no_grad():
        before = model(points=points).logits
        copied = copy.deepcopy(model)
        copied.base_model.any2point["default"].head.layers[-1].bias.add_(1.0)  # the last layer: every logit + 1
        assert torch.allclose(copied(points=points).logits, before + 1.0, atol=1e-6)
        assert torch.equal(model(points=points).logits, before)
        torch.save(model, tmp_path / "model.pt")
        unpickled = torch.load(tmp_path / "model.pt", weights_only=False)
        assert torch.equal(unpickled(points=points).logits, before)
        input_ids = torch.tensor([[101, 2023, 102]])
        assert torch.equal(
            unpickled(input_ids=input_ids).last_hidden_state, model(input_ids=input_ids).last_hidden_state
        )


def test_compiled_blocks_match_eager_and_save_the_same_adapter(points, tmp_path):
    eager = attach()
    with torch.no_grad():  # the up-projections start at zero, which would hide the adapters from the comparison
        for parameter in eager.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.1)
    compiled = attach()
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    compiled.base_model.compile_blocks()
    assert list(compiled.state_dict()) == keys
    labels = torch.tensor([0, 1, 2])
    outputs = []
    for model in (eager, compiled):
        model.eval()  # no dropout, so that both draw nothing at random
        output = model(points=points, labels=labels)
        output.loss.backward()
        outputs.append(output)
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-5, atol=1e-5)
    for (name, expected), (_, actual) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        if expected.requires_grad:
            torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name)
    compiled.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_backbone("bert"), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(points=points).logits, eager(points=points).logits)


def test_torch_compile_of_the_whole_model_leaves_the_geometry_search_and_input_check_eager(points):
    """`torch.compile(peft_model)`, the usual habit: FPS's per-point loop, the kNN search and the finite-input check
    run between compiled graphs. Traced, the FPS loop unrolls into the graph and torch_cluster's kernels fail."""
    model = attach().eval()
    graphs = []

    def record(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, backend=record, dynamic=False)
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(compiled(points=points, labels=labels).loss, model(points=points, labels=labels).loss)
    traced = [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op.startswith("call_")]
    assert "linear" in " ".join(traced)  # the rest of the model was compiled
    assert not [target for target in traced if "topk" in target]  # kNN
    assert sum("argmax" in target for target in traced) == 2  # LocalGeometry's two group ids; FPS adds one per sample
    with pytest.raises(ValueError, match="points contain NaN or infinite values in sample"):
        compiled(points=torch.full_like(points, float("nan")))


def test_unsupported_model_names_what_is_missing():
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1]))
    with pytest.raises(ValueError, match="ResNetModel is not supported by Any2Point: its config names no hidden size"):
        get_peft_model(resnet, tiny_config())
    with pytest.raises(ValueError, match="not a transformers model"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), tiny_config())
    with pytest.raises(ValueError, match="projection='2d' needs a backbone with a 2D patch grid"):
        attach("bert", projection="2d")


# ----- multiple adapters ----------------------------------------------------------------------------------------


def test_named_adapters_add_set_delete_and_save(points, tmp_path):
    model = attach("bert")
    model.add_adapter("other", tiny_config(num_labels=3))
    model.eval()
    assert model(points=points).logits.shape == (3, 5)
    model.set_adapter("other")
    assert model.active_adapter == "other"
    assert model(points=points).logits.shape == (3, 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".any2point.other." in n for n in trainable)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(make_backbone("bert"), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    reloaded.set_adapter("other")
    assert torch.equal(reloaded(points=points).logits, model(points=points).logits)

    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert "other" not in model.base_model.any2point
    assert model(points=points).logits.shape == (3, 5)
    with pytest.raises(ValueError, match="does not exist"):
        model.base_model.set_adapter("other")


# ----- budget and file size -------------------------------------------------------------------------------------


def _count(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "backbone",
    [
        pytest.param(lambda: transformers.BertModel(transformers.BertConfig()), id="bert-base"),
        pytest.param(lambda: transformers.ViTModel(transformers.ViTConfig()), id="vit-base"),
    ],
)
def test_default_config_on_768_wide_12_layer_backbone_is_small(backbone, tmp_path):
    model = get_peft_model(backbone(), Any2PointConfig(num_labels=40))
    trainable, total = _count(model)
    assert trainable / total <= 0.012
    model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size < 5 * 1024 * 1024
    assert abs(size - 4 * trainable) < 64 * 1024  # float32 tensors plus the header, nothing else


# ----- refusing what does not fit -------------------------------------------------------------------------------


def test_adapter_refuses_another_width_or_architecture(tmp_path):
    attach("bert").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["backbone_architecture"], config["backbone_hidden_size"]) == ("BertModel", 32)

    wider = transformers.BertModel(transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"made for a BertModel with hidden size 32.*hidden size 48"):
        PeftModel.from_pretrained(wider, tmp_path)
    with pytest.raises(ValueError, match=r"made for a BertModel .* base model is a ViTModel"):
        PeftModel.from_pretrained(make_backbone("vit"), tmp_path)


def test_adapter_refuses_missing_or_misshapen_tensors(tmp_path):
    from safetensors.torch import save_file

    attach("bert").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    head_key = next(k for k in tensors if k.endswith("head.layers.8.weight"))
    save_file({k: v for k, v in tensors.items() if k != head_key}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="1 missing tensors"):
        PeftModel.from_pretrained(make_backbone("bert"), tmp_path)
    tensors[head_key] = torch.zeros(7, tensors[head_key].shape[1])
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"head.layers.8.weight has shape \(7, 16\) but this model expects \(5, 16\)"):
        PeftModel.from_pretrained(make_backbone("bert"), tmp_path)


def test_truncated_adapter_file_raises(tmp_path):
    attach("bert").save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorError, match="incomplete metadata"):
        PeftModel.from_pretrained(make_backbone("bert"), tmp_path)


# ----- the forward itself ---------------------------------------------------------------------------------------


def test_eval_logits_do_not_depend_on_batch_mates(points):
    model = attach("vit").eval()
    with torch.no_grad():
        together = model(points=points).logits
        alone = torch.cat([model(points=points[i : i + 1]).logits for i in range(len(points))])
        swapped = model(points=torch.cat([points[:1], torch.rand(4, 64, 3)])).logits[0]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(swapped, together[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_logits_do_not_depend_on_point_order(name, points):
    model = attach(name).eval()
    permutation = torch.randperm(points.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(points=points).logits, model(points=points[:, permutation]).logits)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.rand(64, 3), r"shape \(batch, num_points, 3\), got \(64, 3\)"),
        (torch.rand(2, 64, 4), r"shape \(batch, num_points, 3\), got \(2, 64, 4\)"),
        (torch.rand(0, 64, 3), "empty batch"),
        (torch.randint(0, 5, (2, 64, 3)), "floating-point tensor, got dtype torch.int64"),
        (torch.rand(2, 31, 3), "at least 32 points"),
        (
            torch.rand(2, 64, 3).index_put_((torch.tensor([1]), torch.tensor([5])), torch.tensor(float("nan"))),
            r"NaN or infinite values in sample\(s\) \[1\]",
        ),
        (torch.full((1, 64, 3), float("inf")), "NaN or infinite"),
        ([[0.0, 0.0, 0.0]], "must be a torch.Tensor"),
    ],
    ids=["rank", "last-dim", "empty", "integer", "too-few", "nan", "inf", "list"],
)
def test_bad_points_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_points(bad, 32)
    if isinstance(bad, torch.Tensor):
        with pytest.raises(ValueError, match=message):
            attach("bert")(points=bad)


def test_bad_labels_raise_value_error(points):
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        attach("bert")(points=points, labels=torch.tensor([0, 1, 5]))


@pytest.mark.parametrize(
    ("name", "table_name"),
    [("bert", "embeddings.position_embeddings.weight"), ("vit", "embeddings.position_embeddings")],
)
def test_moving_the_model_after_attaching_moves_the_position_table_it_reads(name, table_name):
    """`.to()` after `get_peft_model` (what accelerate's `prepare` does for a GPU) must carry the table along."""
    model = attach(name)
    model.double()  # stands in for a device move: both replace every parameter's storage
    spec = model.base_model.backbone_spec
    weight = model.get_base_model().get_parameter(table_name)
    assert weight.dtype == spec.position_table.dtype == torch.float64
    assert spec.position_table.data_ptr() == weight.data_ptr()  # still the backbone's own table, not a stale copy


def test_frozen_blocks_skip_their_dropout_unless_asked(points):
    """With the adapter's and head's own dropout off, training-mode logits equal eval-mode logits exactly when the
    backbone's dropout is off (the default), and differ when `backbone_dropout=True`; the mode is restored."""
    for backbone_dropout in (False, True):
        model = attach("bert", adapter_dropout=0.0, head_dropout=0.0, backbone_dropout=backbone_dropout)
        expected = model.eval()(points=points).logits
        torch.manual_seed(0)
        trained = model.train()(points=points).logits
        assert torch.equal(trained, expected) is not backbone_dropout
        assert model.base_model.backbone_spec.blocks.training


def test_bf16_autocast_on_cpu(points):
    model = attach("bert")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(points=points, labels=torch.tensor([0, 1, 2]))
    assert output.logits.dtype == torch.bfloat16
    assert torch.isfinite(output.loss)
    output.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("overrides", "absent"),
    [
        ({"use_adapter": False}, "adapters.0"),
        ({"use_local_guidance": False}, "local_qkv"),
    ],
)
def test_parts_can_be_switched_off(overrides, absent, points):
    model = attach("bert", **overrides)
    names = [n for n, _ in model.named_parameters()]
    assert not any(absent in n for n in names)
    assert torch.isfinite(model(points=points).logits).all()


@pytest.mark.parametrize("projection", ["learned", "none", "1d"])
def test_projection_can_be_overridden(projection, points):
    model = attach("vit", projection=projection)
    assert model.base_model.any2point["default"].projection == projection
    assert torch.isfinite(model(points=points).logits).all()
