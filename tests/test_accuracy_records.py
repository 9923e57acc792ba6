"""Accuracy records: built from what the training and evaluation scripts write, merged by key, reported."""

from __future__ import annotations

import json

import pytest

from benchmarks import accuracy


# The fields issue #5 asks every accuracy record to have.
REQUIRED_FIELDS = {"backbone", "dataset", "epochs", "device", "overall_accuracy", "mean_class_accuracy"}
REQUIRED_FIELDS |= {"trainable_params", "adapter_bytes", "voting", "command"}


def write_run(
    folder, accuracy_value: float, seed: int = 42, learning_rate: float = 2e-3, mean_class=0.5, **settings
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"num_epochs": 2, "learning_rate": learning_rate, "seed": seed, "output_dir": str(folder), **settings}
    results = {
        "final_epoch": {"epoch": 2, "wall_time_s": 500.0},
        "test_metrics": {"accuracy": accuracy_value, "mean_class_accuracy": mean_class, "num_samples": 800},
        "data": {"dataset": "modelnet40", "num_train": 9843, "num_points": 512},
        "recipe": {**recipe, "compile_blocks": "auto"},
        "trainable_params": 531864,
        "adapter_bytes": 2_150_000,
    }
    (folder / "results.json").write_text(json.dumps(results))


def test_add_replaces_the_record_of_the_same_run_and_keeps_voting_apart(tmp_path):
    run = tmp_path / "run"
    write_run(run, 0.61)
    common = ["--backbone", "MiniLM", "--device", "cpu", "--command", "make demo", "--results_dir", str(tmp_path)]
    accuracy.main(["add", "--run", str(run), *common])
    write_run(run, 0.63)  # the same run again: replaces
    accuracy.main(["add", "--run", str(run), *common])
    (run / "eval_results.json").write_text(
        json.dumps({"accuracy": 0.64, "mean_class_accuracy": 0.55, "num_samples": 800, "voting": 10})
    )
    accuracy.main(["add", "--run", str(run), "--eval_results", str(run / "eval_results.json"), *common])

    records = json.loads((tmp_path / "accuracy.json").read_text())
    assert [(r["overall_accuracy"], r["voting"]) for r in records] == [(0.63, False), (0.64, True)]
    assert all(set(r) >= REQUIRED_FIELDS for r in records)
    report = (tmp_path / "accuracy.md").read_text()
    assert "| MiniLM | modelnet40 | 512 | 2 of 2 | no | 63.0 | 50.0 | 0.53M | 2.1 MB | cpu | `make demo` |" in report
    assert "| MiniLM | modelnet40 | 512 | 2 of 2 | 10 votes | 64.0 | 55.0 |" in report
    assert "| Any2Point | CLIP-L text | 0.8M | 91.9 | 94.3 |" in report


def test_runs_that_differ_only_by_seed_are_summarised_with_mean_and_standard_deviation(tmp_path):
    def add(name, command, **run):
        write_run(tmp_path / name, **run)
        common = ["--backbone", "MiniLM", "--device", f"cpu {name}", "--command", command]
        accuracy.main(["add", "--run", str(tmp_path / name), *common, "--results_dir", str(tmp_path)])

    add("a", "train --seed 42", accuracy_value=0.80, seed=42, mean_class=0.70)
    add("b", "train --seed 43", accuracy_value=0.83, seed=43, mean_class=0.76)
    add("c", "train --seed 44", accuracy_value=0.90, seed=44)  # another recipe: compiled the same, a new rate
    add("c", "train --seed 44 --learning_rate 1e-3", accuracy_value=0.70, seed=44, learning_rate=1e-3)

    records = json.loads((tmp_path / "accuracy.json").read_text())
    # Paths, how a run is compiled and the seed itself are not part of what has to match.
    assert records[0]["seed"] == 42
    assert records[0]["recipe"] == {"num_epochs": 2, "learning_rate": 2e-3}
    (group,) = accuracy.seed_groups(records)
    assert group["seeds"] == [42, 43, 44]
    assert group["devices"] == ["cpu a", "cpu b", "cpu c"]
    for metric, values in (("overall_accuracy", [0.80, 0.83, 0.90]), ("mean_class_accuracy", [0.70, 0.76, 0.5])):
        mean = sum(values) / 3
        assert group[metric] == values
        assert group[f"{metric}_mean"] == pytest.approx(mean)
        assert group[f"{metric}_stdev"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 2) ** 0.5)
    report = (tmp_path / "accuracy.md").read_text()
    assert (
        "| MiniLM | modelnet40 | 512 | 2 | --learning_rate 0.002 | no | 80.0 (42), 83.0 (43), 90.0 (44) | 84.3 ± 5.1 "
        "| 65.3 ± 13.6 |" in report
    )


def test_seed_groups_of_one_backbone_name_the_flags_that_tell_their_recipes_apart(tmp_path):
    runs = {
        "a42": {"seed": 42, "tuning": "any2point", "stage_widths": None},
        "a43": {"seed": 43, "tuning": "any2point", "stage_widths": None},
        "e42": {"seed": 42, "tuning": "embedder-only", "stage_widths": None},
        "e43": {"seed": 43, "tuning": "embedder-only", "stage_widths": None},
        "n42": {"seed": 42, "tuning": "any2point", "stage_widths": [32, 64, 128]},
        "n43": {"seed": 43, "tuning": "any2point", "stage_widths": [32, 64, 128]},
    }
    for name, settings in runs.items():
        write_run(tmp_path / name, 0.8, **settings)
        common = ["--backbone", "MiniLM", "--device", "cpu", "--command", f"train {name}"]
        accuracy.main(["add", "--run", str(tmp_path / name), *common, "--results_dir", str(tmp_path)])
    write_run(tmp_path / "other", 0.9, seed=42, tuning="lora")  # another backbone: not a peer of the MiniLM groups
    write_run(tmp_path / "other43", 0.9, seed=43, tuning="lora")
    for name in ("other", "other43"):
        common = ["--backbone", "DINOv2", "--device", "cpu", "--command", f"train {name}"]
        accuracy.main(["add", "--run", str(tmp_path / name), *common, "--results_dir", str(tmp_path)])

    records = json.loads((tmp_path / "accuracy.json").read_text())
    assert accuracy.distinguishing_settings(accuracy.seed_groups(records), records) == [
        "--stage_widths (default), --tuning any2point",
        "--stage_widths (default), --tuning embedder-only",
        "--stage_widths 32 64 128, --tuning any2point",
        "",
    ]
    report = (tmp_path / "accuracy.md").read_text()
    assert "| MiniLM | modelnet40 | 512 | 2 | --stage_widths 32 64 128, --tuning any2point | no | 80.0 (42)" in report
    assert "| DINOv2 | modelnet40 | 512 | 2 |  | no | 90.0 (42), 90.0 (43) |" in report


def test_a_peer_run_with_one_seed_still_tells_a_seed_group_apart(tmp_path):
    # A baseline run with two seeds, and the method itself with only one: the baseline's row must say which it is.
    for name, seed, tuning in (("e42", 42, "embedder-only"), ("e43", 43, "embedder-only"), ("a42", 42, "any2point")):
        write_run(tmp_path / name, 0.8, seed=seed, tuning=tuning)
        common = ["--backbone", "MiniLM", "--device", "cpu", "--command", f"train {name}"]
        accuracy.main(["add", "--run", str(tmp_path / name), *common, "--results_dir", str(tmp_path)])

    records = json.loads((tmp_path / "accuracy.json").read_text())
    groups = accuracy.seed_groups(records)
    assert [g["seeds"] for g in groups] == [[42, 43]]
    assert accuracy.distinguishing_settings(groups, records) == ["--tuning embedder-only"]
    report = (tmp_path / "accuracy.md").read_text()
    assert "| MiniLM | modelnet40 | 512 | 2 | --tuning embedder-only | no | 80.0 (42), 80.0 (43) |" in report


def test_a_single_seed_or_a_stopped_run_makes_no_seed_summary(tmp_path):
    write_run(tmp_path / "a", 0.80)
    records = [accuracy.record_from_run(tmp_path / "a", None, None, "MiniLM", "cpu", "train", "")]
    (tmp_path / "a" / "metrics.jsonl").write_text(
        json.dumps(
            {
                "epoch": 1,
                "test_accuracy": 0.5,
                "test_mean_class_accuracy": 0.4,
                "test_samples": 800,
                "wall_time_s": 1.0,
            }
        )
        + "\n"
    )
    records.append(accuracy.record_from_run(None, tmp_path / "a" / "metrics.jsonl", None, "MiniLM", "cpu", "x", ""))
    assert accuracy.seed_groups(records) == []
    assert "Across seeds" not in accuracy.to_markdown(records)


def test_a_stopped_run_is_recorded_from_its_metrics_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    epochs = [
        {"epoch": e, "test_accuracy": 0.1 * e, "test_mean_class_accuracy": 0.05 * e, "test_samples": 2468}
        for e in (1, 2)
    ]
    log.write_text("\n".join(json.dumps({**e, "wall_time_s": 56.0 * e["epoch"]}) for e in epochs) + "\n")
    source = ["--metrics_log", str(log), "--scheduled_epochs", "300"]
    accuracy.main(
        [
            "add",
            *source,
            "--backbone",
            "MiniLM",
            "--device",
            "H200",
            "--command",
            "sh run.sh",
            "--results_dir",
            str(tmp_path),
        ]
    )
    (record,) = json.loads((tmp_path / "accuracy.json").read_text())
    assert record["epochs"] == 2 and record["scheduled_epochs"] == 300
    assert record["overall_accuracy"] == 0.2 and record["test_samples"] == 2468


def write_metrics_log(path, accuracies: list[float]):
    records = [
        {"epoch": epoch, "test_accuracy": value, "test_mean_class_accuracy": value / 2, "train_loss": 1.0}
        for epoch, value in enumerate(accuracies, start=1)
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_learning_curves_read_every_epoch_of_each_log_and_plot_them(tmp_path):
    logs = [
        (label, write_metrics_log(tmp_path / f"{label}.jsonl", accuracies))
        for label, accuracies in (("MiniLM", [0.31, 0.48, 0.64]), ("Whisper", [0.25, 0.44]))
    ]
    curves = accuracy.learning_curves(logs)
    assert [len(runs) for runs in curves.values()] == [1, 1]
    (minilm,), (whisper,) = curves["MiniLM"], curves["Whisper"]
    assert minilm["epoch"] == [1, 2, 3]
    assert minilm["overall_accuracy"] == [31.0, 48.0, 64.0]
    assert whisper["mean_class_accuracy"] == [12.5, 22.0]

    argv = ["curves", "--results_dir", str(tmp_path), *(f"--log={label}={path}" for label, path in logs)]
    accuracy.main(argv)
    assert (tmp_path / "accuracy_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_repeated_label_keeps_every_seed_and_plots_their_mean_and_range(tmp_path):
    seeds = {42: [0.30, 0.80], 43: [0.36, 0.83], 44: [0.27, 0.86]}
    logs = [("LoRA", write_metrics_log(tmp_path / f"lora_{seed}.jsonl", values)) for seed, values in seeds.items()]
    logs.append(("embedder", write_metrics_log(tmp_path / "embedder.jsonl", [0.40, 0.84])))
    curves = accuracy.learning_curves(logs)
    assert len(curves["LoRA"]) == 3 and len(curves["embedder"]) == 1

    band = accuracy.seed_band(curves["LoRA"])
    assert band["epoch"] == [1, 2]
    # Epoch 1: 30, 36 and 27 %; epoch 2: 80, 83 and 86 % (mean-class accuracy is half of each).
    assert band["overall_accuracy"]["mean"] == pytest.approx([31.0, 83.0])
    assert band["overall_accuracy"]["low"] == pytest.approx([27.0, 80.0])
    assert band["overall_accuracy"]["high"] == pytest.approx([36.0, 86.0])
    assert band["mean_class_accuracy"]["mean"] == pytest.approx([15.5, 41.5])

    output = tmp_path / "seeds.png"
    accuracy.main(["curves", "--output", str(output), *(f"--log={label}={path}" for label, path in logs)])
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_under_one_label_must_cover_the_same_epochs(tmp_path):
    logs = [
        ("Any2Point", write_metrics_log(tmp_path / "ten.jsonl", [0.3, 0.5, 0.6])),
        ("Any2Point", write_metrics_log(tmp_path / "stopped.jsonl", [0.3, 0.5])),
    ]
    with pytest.raises(ValueError, match=r"labelled 'Any2Point' cover different epochs .*/stopped\.jsonl"):
        accuracy.learning_curves(logs)


def test_a_log_argument_without_a_label_is_refused(capsys):
    with pytest.raises(SystemExit):
        accuracy.main(["curves", "--log", "run/metrics.jsonl"])
    assert "expected LABEL=PATH/metrics.jsonl, got 'run/metrics.jsonl'" in capsys.readouterr().err


def test_the_committed_report_is_generated_from_the_committed_records():
    records = json.loads((accuracy.RESULTS / accuracy.RECORDS_FILE).read_text(encoding="utf-8"))
    assert [sorted(REQUIRED_FIELDS - set(r)) for r in records] == [[] for _ in records]
    keys = [tuple(r[field] for field in accuracy.KEY_FIELDS) for r in records]
    assert len(set(keys)) == len(keys), "two records share a key; `add` would have replaced one"
    report = (accuracy.RESULTS / accuracy.REPORT_FILE).read_text(encoding="utf-8")
    assert report == accuracy.to_markdown(records), "accuracy.md is stale: run python -m benchmarks.accuracy report"
