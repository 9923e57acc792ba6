"""The supported-backbones table of the README, generated from the test matrix (`tests/conftest.py`'s BACKBONES).

For each architecture of the matrix: the projection that `projection="auto"` resolves to (from the tiny config the
tests train and round-trip) and the positions that projection spreads points over, read from the architecture's
default config (built on the meta device: no weights, no download). Real-weight rows are the backbones that
`tests/test_real_backbones_train.py` trains on ModelNet40.

Run `python -m benchmarks.backbones_table`; it prints the table, writes `benchmarks/results/backbones.md` and puts
it into README.md between the `backbones-table` markers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from peft_any2point import Any2PointConfig
from peft_any2point.backbones import BackboneSpec, resolve_backbone
from peft_any2point.io import atomic_write_text
from peft_any2point.model import resolve_projection
from tests.conftest import BACKBONES, make_backbone


RESULTS_PATH = Path(__file__).resolve().parent / "results" / "backbones.md"
README_PATH = Path(__file__).resolve().parent.parent / "README.md"
README_MARKERS = ("<!-- backbones-table:start -->\n", "<!-- backbones-table:end -->")
# Matrix entry -> the real pre-trained backbone of that architecture trained in tests/test_real_backbones_train.py.
REAL_WEIGHTS = {
    "bert": "all-MiniLM-L6-v2 (1D 512)",
    "whisper_encoder": "Whisper-base encoder (1D 1500)",
    "dinov2": "DINOv2-S/14 (2D 37x37 +1 special)",
}
# Default positions the 1D fallback spreads points over when a backbone has no table (see Any2PointModel._line_table).
FALLBACK_POSITIONS = 512


def describe_positions(spec: BackboneSpec, config: object) -> str:
    """Where point tokens land: table length, patch grid, or rotary base(s) and trained sequence length."""
    if spec.layout == "2d":
        rows, cols = spec.grid_shape
        return f"2D {rows}x{cols} (+{spec.num_special_positions} special)"
    if spec.layout == "1d":
        return f"1D {spec.position_table.shape[0]}"
    if spec.layout == "rotary":
        parameters = config.rope_parameters
        if spec.rotary_layer_types is None:
            thetas = f"θ={parameters['rope_theta']:g}"
        else:
            per_type = {kind: parameters[kind]["rope_theta"] for kind in dict.fromkeys(spec.rotary_layer_types)}
            names = {"full_attention": "global", "sliding_attention": "local"}
            thetas = ", ".join(f"θ={theta:g} {names.get(kind, kind)}" for kind, theta in per_type.items())
        return f"rotary {thetas}; {spec.max_positions} positions"
    return f"none (convolutional PE skipped); 1D {FALLBACK_POSITIONS} sinusoidal stand-in"


def default_spec(tiny: torch.nn.Module) -> tuple[BackboneSpec, object]:
    """Resolve the architecture of `tiny` at its default config size, on the meta device."""
    config = type(tiny.config)()
    with torch.device("meta"):
        model = type(tiny)(config)
    return resolve_backbone(model), config


def build_rows() -> list[dict[str, str]]:
    """One table row per architecture of the test matrix."""
    rows = []
    for name, backbone in BACKBONES.items():
        tiny = make_backbone(name)
        projection = resolve_projection(Any2PointConfig(), resolve_backbone(tiny))
        spec, config = default_spec(tiny)
        architecture = type(tiny).__name__
        get_encoder = getattr(tiny, "get_encoder", None)
        if getattr(tiny.config, "is_encoder_decoder", False) and callable(get_encoder) and get_encoder() is not tiny:
            architecture += " (encoder only)"
        rows.append(
            {
                "architecture": architecture,
                "modality": backbone.modality,
                "projection used": projection,
                "positions (default config)": describe_positions(spec, config),
                "tested (tiny config)": "✓",
                "tested on real weights": f"✓ {REAL_WEIGHTS[name]}" if name in REAL_WEIGHTS else "",
            }
        )
    return rows


def to_markdown(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row[key] for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def with_table(readme: str, table: str) -> str:
    """README text with `table` between the markers (which must be there)."""
    start, end = README_MARKERS
    head, found, rest = readme.partition(start)
    if not found or end not in rest:
        raise ValueError(f"README.md lacks the markers {start.strip()} ... {end}")
    return head + start + table + end + rest.split(end, 1)[1]


def main() -> None:
    table = to_markdown(build_rows())
    atomic_write_text(RESULTS_PATH, table)
    atomic_write_text(README_PATH, with_table(README_PATH.read_text(encoding="utf-8"), table))
    print(table)


if __name__ == "__main__":
    main()
