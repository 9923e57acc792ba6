"""Dataset loaders: each format written small into tmp_path and read back exactly; errors name file and problem."""

import os
import time
from pathlib import Path

import datasets
import h5py
import numpy as np
import pytest
import torch

from peft_any2point.data import (
    DATA_DIR_ENV,
    MODELNET40_CLASSES,
    SCANOBJECTNN_CLASSES,
    SYNTHETIC_CLASSES,
    detect_modelnet40_format,
    load_modelnet40_hdf5,
    load_modelnet40_normal_resampled,
    load_modelnet40_npz,
    load_point_cloud_dataset,
    load_scanobjectnn,
    make_synthetic_dataset,
    resolve_data_dir,
)


CLASSES = np.array(["airplane", "bathtub", "bed"])


def clouds(num_clouds: int, num_points: int, seed: int = 0) -> np.ndarray:
    """Float16-exact coordinates, so that every format round-trips bit for bit."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-64, 64, size=(num_clouds, num_points, 3)) / 64).astype(np.float32)


def write_npz(root: Path, split: str, points: np.ndarray, labels: np.ndarray, overrides: dict | None = None) -> Path:
    """The shared npz layout; `overrides` replaces arrays (None removes one) to make malformed files."""
    arrays = {"classes": CLASSES, "points": points.astype(np.float16), "labels": labels, "names": np.array(["x"])}
    arrays.update(overrides or {})
    np.savez(root / f"{split}.npz", **{key: value for key, value in arrays.items() if value is not None})
    return root / f"{split}.npz"


def write_h5(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        for key, value in arrays.items():
            file.create_dataset(key, data=value)
    return path


def write_hdf5_modelnet(root: Path, shards: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Shards listed as in the official archive (a path that does not exist here), plus shape_names.txt."""
    lines = []
    for index, (points, labels) in enumerate(shards):
        write_h5(root / f"ply_data_train{index}.h5", data=points, label=labels.astype(np.uint8)[:, None])
        lines.append(f"data/modelnet40_ply_hdf5_2048/ply_data_train{index}.h5")
    (root / "train_files.txt").write_text("\n".join(lines) + "\n")
    (root / "shape_names.txt").write_text("\n".join(CLASSES) + "\n")


def write_normal_resampled(root: Path, shapes: dict[str, np.ndarray]) -> None:
    """One text file per shape (x,y,z,nx,ny,nz rows) and the split and class-name lists."""
    for name, xyz in shapes.items():
        folder = root / name.rsplit("_", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        rows = np.concatenate([xyz, np.ones_like(xyz)], axis=1)
        np.savetxt(folder / f"{name}.txt", rows, delimiter=",", fmt="%.6f")
    (root / "modelnet40_test.txt").write_text("\n".join(shapes) + "\n")
    (root / "modelnet40_shape_names.txt").write_text("\n".join(CLASSES) + "\n")


def assert_rows(dataset: datasets.Dataset, points: np.ndarray, labels: np.ndarray, class_names) -> None:
    assert dataset.features["labels"].names == list(class_names)
    assert dataset.features["points"].shape == points.shape[1:]
    batch = dataset[:]
    assert batch["points"].dtype == torch.float32 and batch["labels"].dtype == torch.int64
    torch.testing.assert_close(batch["points"], torch.from_numpy(points), rtol=0, atol=0)
    assert batch["labels"].tolist() == labels.tolist()


def test_npz_round_trips_exactly_and_keeps_the_first_num_points(tmp_path):
    points, labels = clouds(5, 8), np.array([0, 2, 1, 1, 0])
    write_npz(tmp_path, "test", points, labels)
    assert_rows(load_modelnet40_npz(tmp_path, "test", num_points=8), points, labels, CLASSES)
    assert_rows(load_modelnet40_npz(tmp_path, "test", num_points=4), points[:, :4], labels, CLASSES)


def test_npz_train_falls_back_to_the_quantized_file(tmp_path):
    points_u8 = np.random.default_rng(0).integers(0, 256, size=(3, 6, 3), dtype=np.uint8)
    scale, offset = np.float32(2 / 255), np.float32(-1.0)
    np.savez(
        tmp_path / "train_u8.npz",
        classes=CLASSES,
        points_u8=points_u8,
        labels=np.array([2, 0, 1]),
        scale=scale,
        offset=offset,
    )
    expected = points_u8.astype(np.float32) * scale + offset
    assert_rows(load_modelnet40_npz(tmp_path, "train", num_points=6), expected, np.array([2, 0, 1]), CLASSES)
    # With both files present the lossless one wins unless the quantized one is asked for.
    write_npz(tmp_path, "train", clouds(3, 6), np.array([1, 1, 1]))
    assert load_modelnet40_npz(tmp_path, "train", num_points=6)[:]["labels"].tolist() == [1, 1, 1]
    assert load_modelnet40_npz(tmp_path, "train", num_points=6, quantized=True)[:]["labels"].tolist() == [2, 0, 1]


def test_hdf5_shards_are_concatenated_in_listed_order_and_resolved_by_basename(tmp_path):
    first, second = clouds(2, 10, seed=1), clouds(3, 10, seed=2)
    write_hdf5_modelnet(tmp_path, [(first, np.array([0, 1])), (second, np.array([2, 2, 0]))])
    dataset = load_modelnet40_hdf5(tmp_path, "train", num_points=7)
    assert_rows(dataset, np.concatenate([first, second])[:, :7], np.array([0, 1, 2, 2, 0]), CLASSES)


def test_hdf5_without_shape_names_uses_the_standard_modelnet40_classes(tmp_path):
    write_hdf5_modelnet(tmp_path, [(clouds(1, 4), np.array([39]))])
    (tmp_path / "shape_names.txt").unlink()
    dataset = load_modelnet40_hdf5(tmp_path, "train", num_points=4)
    assert dataset.features["labels"].names == list(MODELNET40_CLASSES)
    assert dataset.features["labels"].int2str(int(dataset[0]["labels"])) == "xbox"


def test_normal_resampled_keeps_xyz_of_the_first_rows(tmp_path):
    shapes = {"bed_0001": clouds(1, 12, seed=3)[0], "airplane_0007": clouds(1, 12, seed=4)[0]}
    write_normal_resampled(tmp_path, shapes)
    dataset = load_modelnet40_normal_resampled(tmp_path, "test", num_points=5)
    expected = np.stack([xyz[:5] for xyz in shapes.values()])
    assert_rows(dataset, expected, np.array([2, 0]), CLASSES)


@pytest.mark.parametrize(
    ("variant", "folder", "file_name"),
    [
        ("PB_T50_RS", "main_split", "test_objectdataset_augmentedrot_scale75.h5"),
        ("OBJ_BG", "main_split", "test_objectdataset.h5"),
        ("OBJ_ONLY", "main_split_nobg", "test_objectdataset.h5"),
    ],
)
def test_scanobjectnn_reads_each_variant_by_name(tmp_path, variant, folder, file_name):
    points, labels = clouds(4, 16), np.array([0, 14, 7, 3])
    write_h5(tmp_path / "h5_files" / folder / file_name, data=points, label=labels, mask=np.zeros((4, 16)))
    dataset = load_scanobjectnn(tmp_path, "test", num_points=9, variant=variant)
    assert_rows(dataset, points[:, :9], labels, SCANOBJECTNN_CLASSES)


def test_synthetic_set_is_seeded_normalised_and_split_dependent():
    train = make_synthetic_dataset("train", num_points=64, samples_per_class=2, seed=7)
    assert len(train) == 2 * len(SYNTHETIC_CLASSES)
    assert train.features["labels"].names == list(SYNTHETIC_CLASSES)
    points = train[:]["points"]
    assert points.shape == (16, 64, 3)
    torch.testing.assert_close(points.norm(dim=2).amax(dim=1), torch.ones(16))  # scaled into the unit sphere
    torch.testing.assert_close(points.mean(dim=1), torch.zeros(16, 3), rtol=0, atol=1e-5)
    assert torch.equal(
        make_synthetic_dataset("train", num_points=64, samples_per_class=2, seed=7)[:]["points"], points
    )
    test = make_synthetic_dataset("test", num_points=64, samples_per_class=2, seed=7)
    assert not torch.equal(test[:]["points"], points)


@pytest.mark.parametrize("fmt", ["npz", "hdf5", "normal_resampled"])
def test_dispatcher_detects_the_modelnet40_format(tmp_path, fmt):
    points = clouds(2, 6)
    if fmt == "npz":
        write_npz(tmp_path, "train", points, np.array([1, 0]))
    elif fmt == "hdf5":  # in its standard sub-folder, as unpacked from the archive
        write_hdf5_modelnet(tmp_path / "modelnet40_ply_hdf5_2048", [(points, np.array([1, 0]))])
    else:
        write_normal_resampled(tmp_path, {"bathtub_0001": points[0], "airplane_0001": points[1]})
    assert detect_modelnet40_format(tmp_path)[0] == fmt
    split = "test" if fmt == "normal_resampled" else "train"
    dataset = load_point_cloud_dataset("modelnet40", split, data_dir=tmp_path, num_points=6)
    assert_rows(dataset, points, np.array([1, 0]), CLASSES)


def test_dispatcher_builds_the_synthetic_set_without_data():
    dataset = load_point_cloud_dataset("synthetic", "test", num_points=32, samples_per_class=1)
    assert dataset[:]["points"].shape == (len(SYNTHETIC_CLASSES), 32, 3)


def test_resolve_data_dir_prefers_argument_then_environment_then_shared_folder(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir() is None  # the caller falls back to the synthetic set
    (tmp_path / "shared" / "data" / "modelnet40").mkdir(parents=True)
    assert resolve_data_dir() == Path("..", "shared", "data", "modelnet40")
    monkeypatch.setenv(DATA_DIR_ENV, "/from/env")
    assert resolve_data_dir() == Path("/from/env")
    assert resolve_data_dir("/from/arg") == Path("/from/arg")


def test_missing_files_name_the_path_and_the_expected_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test\.npz not found; expected ModelNet40 npz"):
        load_modelnet40_npz(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=r"train_files\.txt not found; expected modelnet40_ply_hdf5_2048"):
        load_modelnet40_hdf5(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"scale75\.h5 not found; expected ScanObjectNN h5"):
        load_scanobjectnn(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"No ModelNet40 data found in .*expected one of"):
        load_point_cloud_dataset("modelnet40", "train", data_dir=tmp_path)
    write_hdf5_modelnet(tmp_path, [(clouds(1, 4), np.array([0]))])
    (tmp_path / "ply_data_train0.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"ply_data_train0\.h5 not found"):
        load_modelnet40_hdf5(tmp_path, "train", num_points=4)


@pytest.mark.parametrize(
    ("overrides", "num_points", "message"),
    [
        ({"labels": None}, 4, r"test\.npz: missing key\(s\) \['labels'\]"),
        ({"points": np.zeros((2, 4), np.float16)}, 4, r"test\.npz: points have shape \(2, 4\), expected"),
        ({}, 9, r"test\.npz: 4 points per cloud, fewer than num_points=9"),
        ({"labels": np.array([0, 3])}, 4, r"test\.npz: label 3 of sample 1 out of range for 3 classes"),
        ({"labels": np.array([0])}, 4, r"test\.npz: labels have shape \(1,\), expected \(2,\)"),
        ({"points": np.full((2, 4, 3), np.nan, np.float16)}, 4, r"test\.npz: points of sample 0 contain NaN"),
    ],
    ids=["missing-key", "wrong-shape", "too-few-points", "label-out-of-range", "label-count", "nan"],
)
def test_malformed_npz_raises_value_error_naming_file_and_problem(tmp_path, overrides, num_points, message):
    write_npz(tmp_path, "test", clouds(2, 4), np.array([0, 1]), overrides)
    with pytest.raises(ValueError, match=message):
        load_modelnet40_npz(tmp_path, "test", num_points=num_points)


def test_malformed_h5_and_text_files_raise_value_error_naming_the_file(tmp_path):
    write_h5(tmp_path / "h5_files" / "main_split" / "test_objectdataset_augmentedrot_scale75.h5", data=clouds(1, 4))
    with pytest.raises(ValueError, match=r"scale75\.h5: missing key\(s\) \['label'\]"):
        load_scanobjectnn(tmp_path, "test", num_points=4)
    (tmp_path / "h5_files" / "main_split" / "training_objectdataset_augmentedrot_scale75.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match=r"training_objectdataset_augmentedrot_scale75\.h5: not a readable HDF5"):
        load_scanobjectnn(tmp_path, "train", num_points=4)
    write_hdf5_modelnet(tmp_path, [(clouds(2, 4), np.array([0, 1])), (clouds(1, 4), np.array([40]))])
    with pytest.raises(ValueError, match=r"ply_data_train1\.h5: label 40 of sample 0 out of range for 3 classes"):
        load_modelnet40_hdf5(tmp_path, "train", num_points=4)
    write_normal_resampled(tmp_path, {"bed_0001": clouds(1, 3)[0]})
    with pytest.raises(ValueError, match=r"bed_0001\.txt: 3 rows, fewer than num_points=4"):
        load_modelnet40_normal_resampled(tmp_path, "test", num_points=4)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match=r"Unknown dataset 'shapenet'"):
        load_point_cloud_dataset("shapenet", "train")
    with pytest.raises(ValueError, match=r"Unknown split 'validation'"):
        make_synthetic_dataset("validation")
    with pytest.raises(ValueError, match=r"Unknown ScanObjectNN variant 'PB_T99'"):
        load_scanobjectnn("/nowhere", "train", variant="PB_T99")


REAL_DATA = resolve_data_dir()
needs_real_data = pytest.mark.skipif(
    REAL_DATA is None or not (REAL_DATA / "test.npz").is_file(),
    reason=f"ModelNet40 npz not found (set {DATA_DIR_ENV} or place it at ../shared/data/modelnet40)",
)


@needs_real_data
def test_real_modelnet40_test_split_matches_the_npz_file():
    dataset = load_point_cloud_dataset("modelnet40", "test", data_dir=REAL_DATA)
    with np.load(REAL_DATA / "test.npz") as npz:
        expected_points, expected_labels = npz["points"][:3].astype(np.float32), npz["labels"]
    assert len(dataset) == 2468 and dataset.features["labels"].names == list(MODELNET40_CLASSES)
    torch.testing.assert_close(dataset[:3]["points"], torch.from_numpy(expected_points), rtol=0, atol=0)
    assert dataset[:]["labels"].tolist() == expected_labels.tolist()


@needs_real_data
@pytest.mark.slow
def test_real_modelnet40_train_split_builds_in_seconds():
    start = time.perf_counter()
    dataset = load_point_cloud_dataset("modelnet40", "train", data_dir=REAL_DATA)
    elapsed = time.perf_counter() - start
    assert len(dataset) == 9843 and dataset[0]["points"].shape == (1024, 3)
    assert elapsed < 30, f"building the train split took {elapsed:.1f} s"
    print(f"ModelNet40 train split ({os.cpu_count()} CPUs): {elapsed:.2f} s")
