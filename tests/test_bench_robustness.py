"""The robustness benchmark on a tiny random adapter and the synthetic shapes: its outputs, and its accuracies
recomputed independently from the in-memory model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from matplotlib.image import imread
from peft import get_peft_model

from benchmarks import bench_robustness
from peft_any2point.data import SYNTHETIC_CLASSES
from peft_any2point.ops import snap_outliers
from peft_any2point.training import load_split
from peft_any2point.transforms import CORRUPTIONS, SEVERITIES, corrupt
from tests.conftest import TINY, tiny_config


NUM_POINTS, NUM_SAMPLES, SEED = 64, 12, 42


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random adapter saved as train_modelnet leaves it (adapter files + results.json), and the live model."""
    root = tmp_path_factory.mktemp("robustness")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(root / "base")
    backbone = transformers.AutoModel.from_pretrained(root / "base")  # records the folder as the base model
    model = get_peft_model(backbone, tiny_config(num_labels=len(SYNTHETIC_CLASSES))).eval()
    # A random adapter's pooled features differ little between clouds, so it predicts one class for all of them.
    # Centring the head's first layer on the test clouds' mean feature makes its predictions follow the input.
    test = load_split("synthetic", "test", num_points=NUM_POINTS, max_samples=NUM_SAMPLES, seed=SEED)[:]
    first = model.base_model.any2point["default"].head.layers[0]
    seen: list[torch.Tensor] = []
    hook = first.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    with torch.no_grad():
        model(points=test["points"])
        hook.remove()
        first.bias.copy_(-first.weight @ seen[0].mean(dim=0))
    model.save_pretrained(root / "adapter")
    results = {"data": {"dataset": "synthetic", "num_points": NUM_POINTS}}  # what the benchmark reads
    (root / "adapter" / "results.json").write_text(json.dumps(results))
    return root / "adapter", model


@pytest.fixture(scope="module")
def run(adapter, tmp_path_factory) -> tuple[dict, Path]:
    output_dir = tmp_path_factory.mktemp("results")
    args = ["--adapter_path", str(adapter[0]), "--dataset", "synthetic", "--max_eval_samples", str(NUM_SAMPLES)]
    args += ["--batch_size", "8", "--seed", str(SEED), "--output_dir", str(output_dir)]  # 8: a partial last batch
    return bench_robustness.main(args), output_dir


def test_outputs_cover_every_corruption_and_severity(run):
    results, output_dir = run
    assert json.loads((output_dir / "robustness.json").read_text()) == results
    assert results["meta"]["num_samples"] == NUM_SAMPLES and results["meta"]["num_points"] == NUM_POINTS
    assert list(results["corruptions"]) == list(CORRUPTIONS)
    for entry in results["corruptions"].values():
        assert list(entry["severities"]) == [str(severity) for severity in SEVERITIES]
        accuracies = [cell["accuracy"] for cell in entry["severities"].values()]
        assert all(0 <= value <= 1 for value in accuracies)
        assert entry["mean_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
    summary = results["summary"]
    all_cells = [
        cell["accuracy"] for entry in results["corruptions"].values() for cell in entry["severities"].values()
    ]
    assert summary["mean_accuracy"] == pytest.approx(sum(all_cells) / len(all_cells))
    assert summary["accuracy_drop"] == pytest.approx(summary["clean_accuracy"] - summary["mean_accuracy"])
    assert list(summary["mean_accuracy_by_severity"]) == [str(severity) for severity in SEVERITIES]
    table = (output_dir / "robustness.md").read_text()
    assert all(f"| {name} |" in table for name in CORRUPTIONS)
    png = output_dir / "robustness.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert imread(png).ndim == 3  # decodes as an image


def test_accuracies_match_the_model_run_independently(adapter, run):
    """Same seeded subset and corrupted clouds, all in one batch: the benchmark's batches of 8 change nothing."""
    model, results = adapter[1], run[0]
    test = load_split("synthetic", "test", num_points=NUM_POINTS, max_samples=NUM_SAMPLES, seed=SEED)[:]

    def accuracy(points: torch.Tensor) -> float:
        with torch.no_grad():
            return (model(points=points).logits.argmax(-1) == test["labels"]).sum().item() / NUM_SAMPLES

    expected = {"clean": accuracy(test["points"])}
    reported = {"clean": results["clean"]["accuracy"]}
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            generator = torch.Generator().manual_seed(bench_robustness.corruption_seed(SEED, name, severity))
            expected[name, severity] = accuracy(corrupt(test["points"], name, severity, generator=generator))
            reported[name, severity] = results["corruptions"][name]["severities"][str(severity)]["accuracy"]
    assert len(set(expected.values())) > 1, "the random adapter scores alike on every input: pick another SEED"
    assert reported == expected


def test_outlier_filter_override_evaluates_the_adapter_on_snapped_clouds(adapter, tmp_path):
    args = ["--adapter_path", str(adapter[0]), "--dataset", "synthetic", "--max_eval_samples", str(NUM_SAMPLES)]
    args += ["--seed", str(SEED), "--output_dir", str(tmp_path), "--stem", "filtered", "--corruptions", "add_outliers"]
    results = bench_robustness.main([*args, "--outlier_neighbors", "6", "--outlier_std_ratio", "3"])
    assert results["meta"]["outlier_filter"] == {"neighbors": 6, "std_ratio": 3.0}
    assert "outlier filter (6 neighbours, 3.0σ)" in (tmp_path / "filtered.md").read_text(encoding="utf-8")
    assert (tmp_path / "filtered.json").is_file() and (tmp_path / "filtered.png").is_file()

    model = adapter[1]
    test = load_split("synthetic", "test", num_points=NUM_POINTS, max_samples=NUM_SAMPLES, seed=SEED)[:]
    for severity in SEVERITIES:
        generator = torch.Generator().manual_seed(bench_robustness.corruption_seed(SEED, "add_outliers", severity))
        snapped = snap_outliers(corrupt(test["points"], "add_outliers", severity, generator=generator), 6, 3.0)
        with torch.no_grad():
            correct = (model(points=snapped).logits.argmax(-1) == test["labels"]).sum().item()
        assert results["corruptions"]["add_outliers"]["severities"][str(severity)]["accuracy"] == correct / NUM_SAMPLES
