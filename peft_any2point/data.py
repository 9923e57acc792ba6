"""Point-cloud classification datasets as 🤗 `datasets.Dataset` objects in torch format.

Every loader returns rows `{"points": float32 (num_points, 3), "labels": int64}`, with the class names in the
`ClassLabel` feature `dataset.features["labels"].names`. Loaders are thin and format-specific; they validate what
they read, so that a truncated download fails here with the file's name instead of as a shape error mid-training.

Formats:
- ModelNet40 `.npz` (`train.npz`/`test.npz`, or the 8-bit `train_u8.npz`), the project's shared copy;
- ModelNet40 `modelnet40_ply_hdf5_2048` (HDF5 shards listed in `train_files.txt`/`test_files.txt`);
- ModelNet40 `modelnet40_normal_resampled` (one text file per shape, listed in `modelnet40_{train,test}.txt`);
- ScanObjectNN `h5_files/main_split*/{training,test}_objectdataset*.h5`;
- a synthetic set of primitive shapes, generated on the fly, for demos and tests that have no data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import h5py
import numpy as np


DATASET_NAMES = ("modelnet40", "scanobjectnn", "synthetic")
SPLITS = ("train", "test")
DATA_DIR_ENV = "ANY2POINT_DATA"
DEFAULT_DATA_DIR = Path("..", "shared", "data", "modelnet40")

# The official ModelNet40 class order: alphabetical, as in `shape_names.txt` and the shared `.npz` files.
MODELNET40_CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone",
    "cup", "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp",
    "laptop", "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink",
    "sofa", "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox",
)  # fmt: skip
# ScanObjectNN's label order (its `shape_names.txt`); the h5 files carry indices only.
SCANOBJECTNN_CLASSES = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door",
    "shelf", "table", "bed", "pillow", "sink", "sofa", "toilet",
)  # fmt: skip
# ScanObjectNN variant -> (folder under h5_files, file stem after `training_`/`test_`).
SCANOBJECTNN_VARIANTS = {
    "PB_T50_RS": ("main_split", "objectdataset_augmentedrot_scale75"),
    "PB_T50_R": ("main_split", "objectdataset_augmentedrot"),
    "PB_T25_R": ("main_split", "objectdataset_augmented25rot"),
    "PB_T25": ("main_split", "objectdataset_augmented25_norot"),
    "OBJ_BG": ("main_split", "objectdataset"),
    "OBJ_ONLY": ("main_split_nobg", "objectdataset"),
}
SYNTHETIC_CLASSES = ("sphere", "cube", "cylinder", "cone", "torus", "plane", "pyramid", "helix")

NPZ_FORMAT = "ModelNet40 npz: `points` (N, P, 3) float16 and `labels` (N,), or `train_u8.npz` with `points_u8`"
HDF5_FORMAT = "modelnet40_ply_hdf5_2048: `train_files.txt`/`test_files.txt` listing HDF5 shards, `data` (N, 2048, 3)"
NORMAL_RESAMPLED_FORMAT = (
    "modelnet40_normal_resampled: `modelnet40_train.txt`/`..._test.txt` listing shapes, "
    "`<class>/<shape>.txt` rows x,y,z,nx,ny,nz"
)
SCANOBJECTNN_FORMAT = "ScanObjectNN h5: `data` (N, 2048, 3) and `label` (N,) with 15 classes"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the ModelNet40 data lives: the argument, else `$ANY2POINT_DATA`, else `../shared/data/modelnet40`.

    Returns None when none applies, so that the caller can fall back to the synthetic set and say so. An explicit
    argument or environment variable is returned even if it does not exist: a typo must fail loudly, not fall back.
    """
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None


def load_point_cloud_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    num_points: int = 1024,
    **kwargs,
) -> datasets.Dataset:
    """Load `split` of dataset `name` (one of `DATASET_NAMES`); extra kwargs go to the format's loader.

    ModelNet40's format is detected from the files in `data_dir` (see `detect_modelnet40_format`); `data_dir`
    defaults to `resolve_data_dir()`. ScanObjectNN needs an explicit `data_dir` (the folder holding `h5_files`).
    """
    if name == "synthetic":
        return make_synthetic_dataset(split, num_points=num_points, **kwargs)
    if name == "modelnet40":
        root = resolve_data_dir(data_dir)
        if root is None:
            raise FileNotFoundError(
                f"No ModelNet40 data: pass data_dir, set ${DATA_DIR_ENV}, or place it at {DEFAULT_DATA_DIR}"
            )
        fmt, folder = detect_modelnet40_format(root)
        return MODELNET40_LOADERS[fmt](folder, split, num_points=num_points, **kwargs)
    if name == "scanobjectnn":
        if data_dir is None:
            raise FileNotFoundError(
                f"ScanObjectNN needs data_dir, the folder that holds h5_files/ ({SCANOBJECTNN_FORMAT})"
            )
        return load_scanobjectnn(data_dir, split, num_points=num_points, **kwargs)
    raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASET_NAMES}")


def detect_modelnet40_format(data_dir: str | os.PathLike) -> tuple[str, Path]:
    """Which ModelNet40 format `data_dir` holds (`npz`, `hdf5` or `normal_resampled`), and the folder holding it.

    The folder is `data_dir` itself or its standard sub-folder (`modelnet40_ply_hdf5_2048`, ...), so that users
    can point at the folder they unpacked the archive into.
    """
    root = Path(data_dir)
    markers = {
        "npz": ("train.npz", "test.npz", "train_u8.npz"),
        "hdf5": ("train_files.txt", "test_files.txt"),
        "normal_resampled": ("modelnet40_train.txt", "modelnet40_test.txt"),
    }
    subfolders = {"npz": "", "hdf5": "modelnet40_ply_hdf5_2048", "normal_resampled": "modelnet40_normal_resampled"}
    for fmt, files in markers.items():
        for folder in dict.fromkeys((root, root / subfolders[fmt])):
            if any((folder / file).is_file() for file in files):
                return fmt, folder
    raise FileNotFoundError(
        f"No ModelNet40 data found in {root}; expected one of: {NPZ_FORMAT}; {HDF5_FORMAT}; {NORMAL_RESAMPLED_FORMAT}"
    )


def load_modelnet40_npz(
    data_dir: str | os.PathLike, split: str, num_points: int = 1024, quantized: bool = False
) -> datasets.Dataset:
    """ModelNet40 from the shared `{split}.npz`; the train split falls back to `train_u8.npz` (or uses it if asked).

    The 8-bit file (`points = points_u8 * scale + offset`, max error 0.004) exists to carry the train split within
    an upload cap; prefer the lossless file for reported numbers.
    """
    _check_split(split)
    root = Path(data_dir)
    lossless, quantized_path = root / f"{split}.npz", root / f"{split}_u8.npz"
    use_quantized = quantized or (not lossless.is_file() and quantized_path.is_file())
    path = quantized_path if use_quantized else lossless
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected {NPZ_FORMAT}")
    with np.load(path) as npz:
        points_keys = ("points_u8", "scale", "offset") if use_quantized else ("points",)
        _require_keys(path, ("classes", "labels", *points_keys), npz.files)
        points = npz["points_u8"] * npz["scale"] + npz["offset"] if use_quantized else npz["points"]
        labels, class_names = npz["labels"], [str(name) for name in npz["classes"]]
    _validate(path, points, labels, len(class_names), num_points)
    return _to_dataset(points, labels, class_names, num_points, split)


def load_modelnet40_hdf5(data_dir: str | os.PathLike, split: str, num_points: int = 1024) -> datasets.Dataset:
    """ModelNet40 from `modelnet40_ply_hdf5_2048`: the shards listed in `{split}_files.txt`, in order.

    The list holds paths from the original archive (`data/modelnet40_ply_hdf5_2048/ply_data_train0.h5`); shards are
    looked up next to the list by base name. The first `num_points` of the 2,048 points are kept, as is customary.
    """
    _check_split(split)
    root = Path(data_dir)
    listing = root / f"{split}_files.txt"
    shards = [root / Path(line).name for line in _read_lines(listing, HDF5_FORMAT)]
    if not shards:
        raise ValueError(f"{listing}: lists no HDF5 shards")
    class_names = _read_class_names(root / "shape_names.txt", MODELNET40_CLASSES)
    points, labels = [], []
    for shard in shards:
        shard_points, shard_labels = _read_h5(shard, "data", "label", HDF5_FORMAT)
        if shard_labels.ndim == 2 and shard_labels.shape[1] == 1:
            shard_labels = shard_labels[:, 0]  # stored as (N, 1)
        _validate(shard, shard_points, shard_labels, len(class_names), num_points)
        points.append(shard_points[:, :num_points])
        labels.append(shard_labels)
    return _to_dataset(np.concatenate(points), np.concatenate(labels), class_names, num_points, split)


def load_modelnet40_normal_resampled(
    data_dir: str | os.PathLike, split: str, num_points: int = 1024
) -> datasets.Dataset:
    """ModelNet40 from `modelnet40_normal_resampled`: xyz of the first `num_points` rows of each shape's text file."""
    _check_split(split)
    root = Path(data_dir)
    listing = root / f"modelnet40_{split}.txt"
    shape_names = _read_lines(listing, NORMAL_RESAMPLED_FORMAT)
    class_names = _read_class_names(root / "modelnet40_shape_names.txt", MODELNET40_CLASSES)
    class_index = {name: index for index, name in enumerate(class_names)}
    points = np.empty((len(shape_names), num_points, 3), dtype=np.float32)
    labels = np.empty(len(shape_names), dtype=np.int64)
    for row, shape_name in enumerate(shape_names):
        class_name = shape_name.rsplit("_", 1)[0]
        if class_name not in class_index:
            raise ValueError(f"{listing}: shape {shape_name!r} has class {class_name!r}, not in the class names")
        path = root / class_name / f"{shape_name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; expected {NORMAL_RESAMPLED_FORMAT}")
        try:
            xyz = np.loadtxt(path, delimiter=",", usecols=(0, 1, 2), max_rows=num_points, dtype=np.float32, ndmin=2)
        except ValueError as error:
            raise ValueError(f"{path}: not rows of comma-separated x,y,z,nx,ny,nz ({error})") from error
        if len(xyz) < num_points:
            raise ValueError(f"{path}: {len(xyz)} rows, fewer than num_points={num_points}")
        points[row], labels[row] = xyz, class_index[class_name]
        _validate(path, xyz[None], labels[row : row + 1], len(class_names), num_points)
    return _to_dataset(points, labels, class_names, num_points, split)


MODELNET40_LOADERS: dict[str, Callable[..., datasets.Dataset]] = {
    "npz": load_modelnet40_npz,
    "hdf5": load_modelnet40_hdf5,
    "normal_resampled": load_modelnet40_normal_resampled,
}


def load_scanobjectnn(
    data_dir: str | os.PathLike, split: str, num_points: int = 1024, variant: str = "PB_T50_RS"
) -> datasets.Dataset:
    """ScanObjectNN `variant` (default PB_T50_RS, the hardest and most reported) from `data_dir/h5_files/...`.

    `data_dir` may also be the `h5_files` folder itself or the variant's folder (`main_split`).
    """
    _check_split(split)
    if variant not in SCANOBJECTNN_VARIANTS:
        raise ValueError(f"Unknown ScanObjectNN variant {variant!r}; expected one of {tuple(SCANOBJECTNN_VARIANTS)}")
    folder, stem = SCANOBJECTNN_VARIANTS[variant]
    file_name = f"{'training' if split == 'train' else 'test'}_{stem}.h5"
    root = Path(data_dir)
    candidates = [root / "h5_files" / folder / file_name, root / folder / file_name, root / file_name]
    path = next((candidate for candidate in candidates if candidate.is_file()), candidates[0])
    points, labels = _read_h5(path, "data", "label", SCANOBJECTNN_FORMAT)
    _validate(path, points, labels, len(SCANOBJECTNN_CLASSES), num_points)
    return _to_dataset(points, labels, SCANOBJECTNN_CLASSES, num_points, split)


def make_synthetic_dataset(
    split: str, num_points: int = 1024, samples_per_class: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """Primitive shapes (`SYNTHETIC_CLASSES`) with random pose, scale and noise, centred in the unit sphere.

    Deterministic for a given `(split, seed)`, and the splits draw from different streams, so a demo or a test
    can train and evaluate with no data on disk. Defaults: 50 samples per class for train, 20 for test.
    """
    _check_split(split)
    if samples_per_class is None:
        samples_per_class = 50 if split == "train" else 20
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    labels = np.repeat(np.arange(len(SYNTHETIC_CLASSES)), samples_per_class)
    points = np.stack([_synthetic_shape(SYNTHETIC_CLASSES[label], num_points, rng) for label in labels])
    return _to_dataset(points, labels, SYNTHETIC_CLASSES, num_points, split)


def _synthetic_shape(kind: str, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """One noisy, randomly posed and stretched sample of a primitive, normalised into the unit sphere."""
    points = SHAPE_SAMPLERS[kind](num_points, rng)
    points = points * rng.uniform(0.7, 1.3, size=3)  # anisotropic stretch: no two samples identical
    points = points @ _random_rotation(rng).T
    points = points + rng.normal(scale=0.01, size=points.shape)
    points = points - points.mean(axis=0)
    return (points / np.linalg.norm(points, axis=1).max()).astype(np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3) (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _sample_mesh(vertices: np.ndarray, faces: np.ndarray, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """Points uniform on a triangle mesh's surface: pick faces by area, then uniform barycentric coordinates."""
    corners = vertices[faces]  # (faces, 3 corners, xyz)
    areas = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    chosen = corners[rng.choice(len(faces), size=num_points, p=areas / areas.sum())]
    u, v = rng.random((2, num_points, 1))
    flip = (u + v) > 1  # reflect into the triangle
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    return chosen[:, 0] + u * (chosen[:, 1] - chosen[:, 0]) + v * (chosen[:, 2] - chosen[:, 0])


_CUBE_VERTICES = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
_CUBE_FACES = np.array(
    [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4],
     [1, 5, 7], [1, 7, 3]]
)  # fmt: skip
_PYRAMID_VERTICES = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1], [0, 0, 1]], dtype=np.float64)
_PYRAMID_FACES = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
_PLANE_VERTICES = np.array([[-1, -1, 0], [-1, 1, 0], [1, -1, 0], [1, 1, 0]], dtype=np.float64)
_PLANE_FACES = np.array([[0, 1, 3], [0, 3, 2]])


def _sample_sphere(num_points: int, rng: np.random.Generator) -> np.ndarray:
    points = rng.normal(size=(num_points, 3))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def _sample_cylinder(num_points: int, rng: np.random.Generator) -> np.ndarray:
    """Radius 0.5, height 2, caps included; side vs caps chosen by area (2π vs π/2)."""
    angle = rng.uniform(0, 2 * np.pi, num_points)
    on_side = rng.random(num_points) < 0.8
    radius = np.where(on_side, 0.5, 0.5 * np.sqrt(rng.random(num_points)))
    z = np.where(on_side, rng.uniform(-1, 1, num_points), rng.choice([-1.0, 1.0], num_points))
    return np.stack([radius * np.cos(angle), radius * np.sin(angle), z], axis=1)


def _sample_cone(num_points: int, rng: np.random.Generator) -> np.ndarray:
    """Base radius 1 at z=-1, apex at z=1; the lateral surface (area √5·π) vs the base (π) by area."""
    angle = rng.uniform(0, 2 * np.pi, num_points)
    on_side = rng.random(num_points) < np.sqrt(5) / (np.sqrt(5) + 1)
    radius = np.sqrt(rng.random(num_points))  # uniform on a disc, and on the cone's unrolled sector
    z = np.where(on_side, 1 - 2 * radius, -1.0)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle), z], axis=1)


def _sample_torus(num_points: int, rng: np.random.Generator) -> np.ndarray:
    """Major radius 1, minor 0.3; the tube angle is drawn by rejection so that points are uniform on the surface."""
    major, minor = 1.0, 0.3
    tube = np.empty(0)
    while len(tube) < num_points:
        candidates = rng.uniform(0, 2 * np.pi, 2 * num_points)
        accept = rng.random(2 * num_points) < (major + minor * np.cos(candidates)) / (major + minor)
        tube = np.concatenate([tube, candidates[accept]])
    tube, ring = tube[:num_points], rng.uniform(0, 2 * np.pi, num_points)
    radius = major + minor * np.cos(tube)
    return np.stack([radius * np.cos(ring), radius * np.sin(ring), minor * np.sin(tube)], axis=1)


def _sample_helix(num_points: int, rng: np.random.Generator) -> np.ndarray:
    """Two turns of a thin tube (radius 0.05) around the z axis."""
    t = rng.uniform(0, 4 * np.pi, num_points)
    centre = np.stack([np.cos(t), np.sin(t), t / (2 * np.pi) - 1], axis=1)
    return centre + rng.normal(scale=0.05, size=centre.shape)


SHAPE_SAMPLERS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "sphere": _sample_sphere,
    "cube": lambda n, rng: _sample_mesh(_CUBE_VERTICES, _CUBE_FACES, n, rng),
    "cylinder": _sample_cylinder,
    "cone": _sample_cone,
    "torus": _sample_torus,
    "plane": lambda n, rng: _sample_mesh(_PLANE_VERTICES, _PLANE_FACES, n, rng),
    "pyramid": lambda n, rng: _sample_mesh(_PYRAMID_VERTICES, _PYRAMID_FACES, n, rng),
    "helix": _sample_helix,
}


def _validate(source: Path, points: np.ndarray, labels: np.ndarray, num_classes: int, num_points: int) -> None:
    """Reject what `source` holds unless it is (N, >= num_points, >= 3) finite points with N labels in range."""
    if points.ndim != 3 or points.shape[2] < 3:
        raise ValueError(f"{source}: points have shape {points.shape}, expected (num_clouds, num_points, 3)")
    if points.shape[1] < num_points:
        raise ValueError(f"{source}: {points.shape[1]} points per cloud, fewer than num_points={num_points}")
    if labels.shape != (len(points),):
        raise ValueError(f"{source}: labels have shape {labels.shape}, expected ({len(points)},) to match the points")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels have dtype {labels.dtype}, expected integers")
    out_of_range = (labels < 0) | (labels >= num_classes)
    if out_of_range.any():
        sample = np.flatnonzero(out_of_range)[0]
        raise ValueError(f"{source}: label {labels[sample]} of sample {sample} out of range for {num_classes} classes")
    finite = np.isfinite(points[:, :num_points, :3]).all(axis=(1, 2))
    if not finite.all():
        raise ValueError(f"{source}: points of sample {np.flatnonzero(~finite)[0]} contain NaN or infinite values")


def _to_dataset(
    points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], num_points: int, split: str
) -> datasets.Dataset:
    """Wrap validated arrays with fixed-shape features: one Arrow conversion, no per-row Python work."""
    features = datasets.Features(
        {
            "points": datasets.Array2D(shape=(num_points, 3), dtype="float32"),
            "labels": datasets.ClassLabel(names=list(class_names)),
        }
    )
    columns = {
        "points": np.ascontiguousarray(points[:, :num_points, :3], dtype=np.float32),
        "labels": labels.astype(np.int64),
    }
    return datasets.Dataset.from_dict(columns, features=features, split=split).with_format("torch")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}")


def _require_keys(path: Path, required: Sequence[str], present: Sequence[str]) -> None:
    missing = [key for key in required if key not in present]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; found {list(present)}")


def _read_lines(path: Path, expected_format: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected {expected_format}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_class_names(path: Path, default: Sequence[str]) -> list[str]:
    """Class names from a one-per-line file where the dataset ships one, else the dataset's standard list."""
    return _read_lines(path, "one class name per line") if path.is_file() else list(default)


def _read_h5(path: Path, points_key: str, labels_key: str, expected_format: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected {expected_format}")
    try:
        with h5py.File(path, "r") as file:
            _require_keys(path, (points_key, labels_key), list(file.keys()))
            return file[points_key][()], file[labels_key][()]
    except OSError as error:
        raise ValueError(f"{path}: not a readable HDF5 file ({error})") from error
