"""The library side of training: resumable data order, checkpoints, voting evaluation and metrics."""

from __future__ import annotations

import json
import math
import random
import re
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model, get_peft_model_state_dict
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    WhisperModel,
    get_cosine_schedule_with_warmup,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from peft_any2point.data import make_synthetic_dataset
from peft_any2point.training import (
    RESUMABLE_ARGUMENTS,
    CollapseGuard,
    EpochShuffleSampler,
    PointCloudData,
    RepresentationCollapseError,
    TrainingProgress,
    batch_spread,
    find_latest_checkpoint,
    load_backbone,
    load_checkpoint,
    load_train_test,
    make_dataloaders,
    point_cloud_metrics,
    predict,
    remove_earlier_checkpoints,
    resolve_checkpoint,
    restore_rng_state,
    rng_state,
    run_recipe,
    save_adapter,
    save_checkpoint,
    write_metrics_log,
)
from tests.conftest import TINY, make_backbone, tiny_config


@pytest.fixture
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def test_shuffle_order_depends_on_seed_and_epoch_only():
    first, again = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    first.set_epoch(4)
    again.set_epoch(4)
    order = list(first)
    assert sorted(order) == list(range(50))
    assert list(again) == order == list(first)  # no hidden state advances between passes
    again.set_epoch(5)
    assert list(again) != order
    other_seed = EpochShuffleSampler(50, seed=4)
    other_seed.set_epoch(4)
    assert list(other_seed) != order


def small_synthetic_data() -> PointCloudData:
    """8 classes: 24 train clouds (6 batches of 4) and 8 test clouds, of 8 points each."""
    return PointCloudData(
        make_synthetic_dataset("train", num_points=8, samples_per_class=3),
        make_synthetic_dataset("test", num_points=8, samples_per_class=1),
        "synthetic",
        "test",
    )


def test_skipping_batches_resumes_the_same_shuffled_order(accelerator):
    data = small_synthetic_data()
    train, _ = make_dataloaders(data, batch_size=4, seed=7)
    train = accelerator.prepare(train)
    train.set_epoch(2)
    full = [batch["points"] for batch in train]
    skipped = accelerator.skip_first_batches(train, 2)
    skipped.set_epoch(2)
    rest = [batch["points"] for batch in skipped]
    assert len(full) == 24 // 4 and len(rest) == len(full) - 2
    for expected, actual in zip(full[2:], rest, strict=True):
        assert torch.equal(expected, actual)


def test_iterating_the_loaders_leaves_the_global_rng_alone():
    """Dropout draws from the global RNG; a resumed run creates an extra iterator, which must not shift it."""
    data = PointCloudData(
        make_synthetic_dataset("train", num_points=8, samples_per_class=2),
        make_synthetic_dataset("test", num_points=8, samples_per_class=1),
        "synthetic",
        "test",
    )
    state = torch.get_rng_state()
    for loader in make_dataloaders(data, batch_size=4, seed=0):
        list(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_max_samples_keep_a_seeded_subset_of_every_class():
    data = load_train_test("synthetic", num_points=16, max_train_samples=40, max_eval_samples=16, seed=1)
    again = load_train_test("synthetic", num_points=16, max_train_samples=40, max_eval_samples=16, seed=1)
    assert (len(data.train), len(data.test)) == (40, 16)
    assert torch.equal(data.train[:]["points"], again.train[:]["points"])
    assert len(set(data.train[:]["labels"].tolist())) > 4  # a random subset, not the first classes' prefix
    assert data.class_names == list(data.train.features["labels"].names)


def test_subsets_keep_the_points_as_an_array_feature():
    """A subset must keep the split's (N, 3) Array2D feature: as nested lists, batches load about 100x slower."""
    full = load_train_test("synthetic", num_points=16, seed=1)
    subset = load_train_test("synthetic", num_points=16, max_train_samples=40, max_eval_samples=16, seed=1)
    assert isinstance(full.train.features["points"], datasets.Array2D)
    for split in ("train", "test"):
        assert getattr(subset, split).features == getattr(full, split).features
    batch = next(iter(make_dataloaders(subset, batch_size=4, seed=0)[0]))
    assert batch["points"].shape == (4, 16, 3) and batch["points"].dtype == torch.float32


def test_modelnet40_without_data_falls_back_to_synthetic_and_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("ANY2POINT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data/modelnet40 from here
    data = load_train_test("modelnet40", num_points=16, max_train_samples=8, max_eval_samples=8)
    assert data.dataset == "synthetic"
    assert "no ModelNet40 found" in data.source


def test_an_explicit_data_dir_never_falls_back(tmp_path):
    with pytest.raises(FileNotFoundError, match="No ModelNet40 data found in"):
        load_train_test("modelnet40", data_dir=str(tmp_path / "typo"), num_points=16)


# ----- checkpoints -----------------------------------------------------------------------------------------------


def _training_setup(accelerator: Accelerator, seed: int = 0):
    model = get_peft_model(make_backbone("bert", seed=seed), tiny_config())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, 10)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler, generator: torch.Generator) -> None:
    model.train()
    points = torch.rand(4, 64, 3, generator=generator) * 2 - 1
    model(points=points, labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_checkpoint_round_trip_restores_trainable_state_optimizer_scheduler_and_every_rng(accelerator, tmp_path):
    model, optimizer, scheduler = _training_setup(accelerator)
    generator = torch.Generator().manual_seed(5)
    _train_step(model, optimizer, scheduler, generator)
    progress = TrainingProgress(epoch=1, step=3, batch_in_epoch=2, loss_sum=4.5, elapsed_s=1.0)
    history = [{"epoch": 1, "test_accuracy": 0.5}]
    path = save_checkpoint(tmp_path, accelerator, model, optimizer, scheduler, generator, progress, history)
    assert path == tmp_path / "checkpoint-3"
    assert sorted(p.name for p in path.iterdir()) == [
        "rng_state_0.pt",
        "trainable_state.safetensors",
        "training_state.pt",
    ]
    saved_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    backbone_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    saved_numel = sum(v.numel() for v in saved_state.values())
    assert saved_numel < backbone_params  # trainable state only, not the whole model
    expected_draws = (random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=generator))
    saved_lr = scheduler.get_last_lr()

    # Move everything on, then restore into a freshly built model.
    fresh, fresh_optimizer, fresh_scheduler = _training_setup(accelerator, seed=1)
    _train_step(fresh, fresh_optimizer, fresh_scheduler, torch.Generator().manual_seed(9))
    _train_step(fresh, fresh_optimizer, fresh_scheduler, torch.Generator().manual_seed(9))
    fresh_generator = torch.Generator().manual_seed(123)
    restored, restored_history = load_checkpoint(
        path, accelerator, fresh, fresh_optimizer, fresh_scheduler, fresh_generator
    )

    assert restored == progress
    assert restored_history == history
    for key, value in get_peft_model_state_dict(fresh).items():
        assert torch.equal(value, saved_state[key]), key
    assert fresh_scheduler.get_last_lr() == saved_lr
    assert fresh_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert random.random() == expected_draws[0]
    assert np.random.rand() == expected_draws[1]
    assert torch.equal(torch.rand(3), expected_draws[2])
    assert torch.equal(torch.rand(3, generator=fresh_generator), expected_draws[3])


def test_a_crash_while_saving_leaves_no_checkpoint_that_looks_complete(accelerator, tmp_path):
    model, optimizer, scheduler = _training_setup(accelerator)
    generator = torch.Generator().manual_seed(0)
    save_checkpoint(tmp_path, accelerator, model, optimizer, scheduler, generator, TrainingProgress(step=2), [])
    crash = mock.patch("peft_any2point.training.torch.save", side_effect=OSError("disk full"))
    with crash, pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, accelerator, model, optimizer, scheduler, generator, TrainingProgress(step=4), [])
    assert not (tmp_path / "checkpoint-4").exists()
    assert (tmp_path / ".checkpoint-4.partial").is_dir()  # the debris is hidden and ignored
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-2"


def test_latest_checkpoint_is_the_highest_step_not_the_last_in_name_order(tmp_path):
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-x", ".checkpoint-11.partial"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-12").write_text("a file, not a folder")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert find_latest_checkpoint(tmp_path / "checkpoint-x") is None


def test_a_checkpoint_limit_keeps_the_newest_and_nothing_of_another_run(accelerator, tmp_path):
    model, optimizer, scheduler = _training_setup(accelerator)
    generator = torch.Generator().manual_seed(0)
    (tmp_path / "checkpoint-12").mkdir()  # left by an abandoned run that this one was resumed behind
    (tmp_path / ".checkpoint-10.partial").mkdir()  # a save that was cut off
    for step in (2, 4, 6):
        progress = TrainingProgress(step=step)
        save_checkpoint(tmp_path, accelerator, model, optimizer, scheduler, generator, progress, [], keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".checkpoint-10.partial",
        "checkpoint-12",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert load_checkpoint(tmp_path / "checkpoint-4", accelerator, model, optimizer, scheduler, generator)[0].step == 4

    assert remove_earlier_checkpoints(tmp_path, 6, keep_last=1) == [tmp_path / "checkpoint-4"]
    assert remove_earlier_checkpoints(tmp_path, 6, keep_last=1) == []
    with pytest.raises(ValueError, match=r"keep_last must be at least 1 \(the checkpoint just written\), got 0"):
        remove_earlier_checkpoints(tmp_path, 6, keep_last=0)
    assert (tmp_path / "checkpoint-6").is_dir()


def test_resolving_a_missing_checkpoint_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume_from_checkpoint latest: no checkpoint-<step> in"):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-5 is not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "checkpoint-5"), tmp_path)


def test_loading_an_incomplete_or_mismatched_checkpoint_is_refused(accelerator, tmp_path):
    model, optimizer, scheduler = _training_setup(accelerator)
    generator = torch.Generator()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a complete Any2Point checkpoint: \['trainable_state"):
        load_checkpoint(tmp_path / "empty", accelerator, model, optimizer, scheduler, generator)
    path = save_checkpoint(tmp_path, accelerator, model, optimizer, scheduler, generator, TrainingProgress(step=1), [])
    state = torch.load(path / "training_state.pt", weights_only=False)
    torch.save({**state, "num_processes": 2}, path / "training_state.pt")
    with pytest.raises(ValueError, match="written by 2 processes; resuming it with 1 would change the data order"):
        load_checkpoint(path, accelerator, model, optimizer, scheduler, generator)


def test_a_checkpoint_records_what_the_run_computes_and_not_where_it_ran(accelerator):
    model, _, _ = _training_setup(accelerator)
    arguments = {
        "learning_rate": 1e-3,
        "num_epochs": 15,
        "stage_widths": [16, 24],
        **dict.fromkeys(RESUMABLE_ARGUMENTS),
    }
    recipe = run_recipe(arguments, model.peft_config["default"])
    assert recipe == {
        "learning_rate": 1e-3,
        "num_epochs": 15,
        "stage_widths": [16, 24],
        "backbone": {"backbone_architecture": "BertModel", "backbone_hidden_size": TINY["hidden_size"],
                     "backbone_num_layers": TINY["num_hidden_layers"]},
    }  # fmt: skip


def test_resuming_under_another_recipe_is_refused_unless_allowed(accelerator, tmp_path):
    model, optimizer, scheduler = _training_setup(accelerator)
    generator = torch.Generator()
    recipe = {"learning_rate": 1e-3, "num_epochs": 15, "backbone": {"backbone_hidden_size": 32}}
    path = save_checkpoint(
        tmp_path, accelerator, model, optimizer, scheduler, generator, TrainingProgress(step=1), [], recipe
    )
    restored, _ = load_checkpoint(path, accelerator, model, optimizer, scheduler, generator, dict(recipe))
    assert restored.step == 1

    changed = {**recipe, "learning_rate": 2e-3, "backbone": {"backbone_hidden_size": 64}, "seed": 43}
    message = (
        "checkpoint-1 was written by a run with another recipe (backbone: {'backbone_hidden_size': 32} in the "
        "checkpoint, {'backbone_hidden_size': 64} now; learning_rate: 0.001 in the checkpoint, 0.002 now; seed: None "
        "in the checkpoint, 43 now). Resume with the same settings"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_checkpoint(path, accelerator, model, optimizer, scheduler, generator, changed)
    with pytest.warns(UserWarning, match=r"changed recipe \(backbone: .*a new --learning_rate does not apply"):
        restored, _ = load_checkpoint(path, accelerator, model, optimizer, scheduler, generator, changed, True)
    assert restored.step == 1

    # A checkpoint written without a recipe (before recipes were recorded) still resumes.
    unrecorded = save_checkpoint(
        tmp_path, accelerator, model, optimizer, scheduler, generator, TrainingProgress(step=2), []
    )
    assert load_checkpoint(unrecorded, accelerator, model, optimizer, scheduler, generator, changed)[0].step == 2


# ----- evaluation ------------------------------------------------------------------------------------------------


class MeanCoordinateModel(torch.nn.Module):
    """Logits = the mean xyz of each cloud: a model whose outputs a test can compute by hand."""

    def forward(self, points: torch.Tensor) -> mock.Mock:
        return mock.Mock(logits=points.mean(dim=1))


def _shift_by_one(points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return points + 1.0


def test_voting_averages_the_plain_and_the_augmented_copies(accelerator):
    points = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    loader = accelerator.prepare(DataLoader(TensorDataset(points, labels), batch_size=2))
    loader = [{"points": p, "labels": y} for p, y in loader]
    model = MeanCoordinateModel()

    logits, gathered_labels = predict(model, loader, accelerator)
    assert torch.equal(logits, points.mean(dim=1))
    assert torch.equal(gathered_labels, labels)
    voted, _ = predict(model, loader, accelerator, num_votes=4, augment=_shift_by_one)
    # one plain copy and three shifted by one: the mean moves by 3/4
    torch.testing.assert_close(voted, points.mean(dim=1) + 0.75)


def test_voting_without_an_augmentation_is_refused(accelerator):
    with pytest.raises(ValueError, match="voting needs an augmentation"):
        predict(MeanCoordinateModel(), [], accelerator, num_votes=2)


def test_point_cloud_metrics_match_hand_computed_values():
    # predictions 0, 1, 1, 1, 0 against references 0, 0, 1, 1, 2
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 2.0, 0.0], [1.0, 0.0, 0.5]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    result = point_cloud_metrics(logits, labels, ["cup", "cone", "car"])
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["per_class_accuracy"] == {"cup": 0.5, "cone": 1.0, "car": 0.0}
    assert result["mean_class_accuracy"] == pytest.approx(0.5)
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert result["num_samples"] == 5
    expected_loss = np.mean(
        [
            math.log(sum(math.exp(v) for v in row)) - row[y]
            for row, y in zip(logits.tolist(), labels.tolist(), strict=True)
        ]
    )
    assert result["loss"] == pytest.approx(expected_loss)


# ----- outputs ---------------------------------------------------------------------------------------------------


def test_save_adapter_moves_in_exactly_the_adapter_files(tmp_path):
    model = get_peft_model(make_backbone("bert"), tiny_config())
    path = save_adapter(model, tmp_path)
    assert path == tmp_path / "adapter_model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "ANY2POINT"
    umask = _umask()
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask


def test_metrics_log_is_rewritten_from_the_history(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n')  # a killed run got further than its checkpoint
    write_metrics_log(log, [{"epoch": 1, "test_accuracy": 0.25}])
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"epoch": 1, "test_accuracy": 0.25}]


def test_batch_spread_matches_a_float64_loop():
    features = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 3 + 1
    rows = features.double().tolist()
    mean = [sum(column) / len(rows) for column in zip(*rows, strict=True)]
    distance = sum(math.dist(row, mean) for row in rows) / len(rows)
    norm = sum(math.hypot(*row) for row in rows) / len(rows)
    assert batch_spread(features).item() == pytest.approx(distance / norm, rel=1e-6)
    assert batch_spread(features.bfloat16()).dtype == torch.float32
    assert batch_spread(features * 1e3).item() == pytest.approx(distance / norm, rel=1e-5)  # relative to the norm
    assert batch_spread(features[:1].expand(5, -1)).item() < 1e-6  # 0 up to the rounding of the mean
    assert math.isnan(batch_spread(features[:1]).item())  # one cloud has no spread to measure


def test_collapse_guard_stops_at_the_patience_th_low_batch_in_a_row():
    guard = CollapseGuard(threshold=0.02, patience=3)
    for step, spread in enumerate([0.3, 0.01, 0.01, 0.2, 0.01, float("nan"), 0.005], start=1):
        guard.update(spread, step)  # a healthy batch resets the count; NaN (a batch of one) neither counts nor resets
    assert guard.batches_below == 2
    with pytest.raises(
        RepresentationCollapseError, match=r"collapse at step 8: for 3 batches in a row .* 0.0004 < 0.02"
    ):
        guard.update(0.0004, 8)
    off = CollapseGuard(threshold=0.0, patience=1)
    off.update(0.0, 1)
    assert off.batches_below == 0


def _umask() -> int:
    import os

    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        (lambda: make_backbone("whisper_encoder"), WhisperEncoder),  # AutoModel would add a random decoder
        (lambda: make_backbone("whisper"), WhisperModel),
        (lambda: BertForSequenceClassification(BertConfig(**TINY)), BertModel),  # a head model: its base
    ],
    ids=["whisper-encoder", "whisper-model", "bert-with-head"],
)
def test_load_backbone_builds_the_saved_headless_class_with_its_exact_weights(tmp_path, saved, expected):
    torch.manual_seed(0)
    model = saved()
    model.save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path), torch.device("cpu"))
    assert type(backbone) is expected
    source = model.base_model.state_dict() if expected is BertModel else model.state_dict()
    loaded = backbone.state_dict()
    assert source.keys() == loaded.keys()
    for name, tensor in source.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def test_an_augmentation_state_from_another_device_is_reseeded_reproducibly():
    """A GPU checkpoint resumed on a CPU: the CUDA generator's 16-byte state cannot drive a CPU generator."""
    state = rng_state(torch.Generator().manual_seed(0))
    state["augment"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA (Philox) generator's state
    draws = []
    for _ in range(2):
        generator = torch.Generator()
        with pytest.warns(UserWarning, match="written on another kind of device"):
            restore_rng_state(state, generator)
        draws.append(torch.rand(4, generator=generator))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    # The reseed depends on the saved torch state, so checkpoints from other points of a run draw differently.
    state["torch"] = torch.Generator().manual_seed(1).get_state()
    generator = torch.Generator()
    with pytest.warns(UserWarning):
        restore_rng_state(state, generator)
    assert not torch.equal(torch.rand(4, generator=generator), draws[0])


def test_loader_workers_yield_the_same_batches_in_the_same_order(accelerator):
    """Workers only assemble batches: the train order (also when resuming mid-epoch) and the test order hold."""
    data = small_synthetic_data()
    batches = {}
    for workers in (0, 2):
        train, test = accelerator.prepare(*make_dataloaders(data, batch_size=4, seed=7, num_workers=workers))
        train.set_epoch(3)
        skipped = accelerator.skip_first_batches(train, 2)
        skipped.set_epoch(3)
        batches[workers] = [b["points"] for loader in (train, skipped, test) for b in loader]
    assert len(batches[0]) == 6 + 4 + 2
    for expected, actual in zip(batches[0], batches[2], strict=True):
        assert torch.equal(expected, actual)
