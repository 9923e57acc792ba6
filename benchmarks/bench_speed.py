"""Speed of an Any2Point model against its bare backbone on the same tokens, and how close both get to the matmul peak.

Measured in one run, on the CPU:

- the machine's matmul peak (square fp32 and bf16 matmuls, best block of `torch.utils.benchmark.Timer`);
- inference (eval mode, no grad) and a training step (forward + backward + AdamW) of the bare backbone and of
  Any2Point, in fp32 and under bf16 autocast. The bare backbone runs `backbone(inputs_embeds=...)` on the same
  B × (1 + T) hidden states that Any2Point feeds its blocks; in its training step the blocks stay frozen and the
  gradient flows to the inputs (AdamW updates the input tensor), as in Any2Point, whose gradient must cross every
  frozen block to reach the embedder;
- FLOPs per step counted by `FlopCounterMode` (matmul-class ops only: FPS, kNN and gathers count as zero) and the
  achieved fraction of the peak;
- where Any2Point's step time goes (embedder, position encoding, adapters, backbone blocks, head, optimizer), from
  module hooks: CPU kernels are synchronous, so wall time between hooks is the time of the ops between them;
- parameter counts and the adapter file size, for the timed backbone and a 768-wide 12-layer BERT.

Run `python -m benchmarks.bench_speed` for `benchmarks/results/speed.{json,md}` and the table (a few minutes on two
cores); `--quick` runs tiny sizes into `speed_quick.{json,md}`, and `--backbone tiny` needs no pre-trained weights.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from peft import get_peft_model
from torch import Tensor, nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import BertConfig, BertModel

import peft_any2point.embedder
from benchmarks.reporting import cpu_name
from benchmarks.timing import interleaved_median
from peft_any2point import Any2PointConfig
from peft_any2point.adapter import LocalGeometry
from peft_any2point.allocator import keep_freed_memory
from peft_any2point.io import atomic_write_text
from peft_any2point.model import backbone_dropout_mode
from peft_any2point.ops import default_backend


RESULTS = Path(__file__).parent / "results"
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("inference", "train")
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
EMBEDDER = "embedder: layers"
# The geometry kernels the embedder calls, by the names it calls them: timed as parts of their own.
EMBEDDER_KERNELS = {"farthest_point_sampling": "embedder: FPS", "knn_indices": "embedder: kNN"}
PARTS = (
    *EMBEDDER_KERNELS.values(),
    EMBEDDER,
    "position encoding",
    "adapter geometry",
    "adapters",
    "backbone blocks",
    "head",
)
QUICK = {
    "batch_size": 2,
    "num_points": 256,
    "num_tokens": 64,
    "matmul_size": 512,
    "min_run_time": 0.3,
    "rounds": 2,
    "breakdown_steps": 1,
}


def cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(
    grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the one sdpa runs on the CPU (without dropout), which it
# would count as zero: count it like the others (the formulas get shapes, as FlopCounterMode's own do).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
}


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's shape, shared by the CPU step benchmarks: backbone, clouds per batch, points, tokens, and the
    embedder's per-neighbour work (neighbours and stage widths), a large part of what Any2Point adds."""
    parser.add_argument("--backbone", choices=["minilm", "tiny"], default="minilm", help="tiny: random 2-layer BERT")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_points", type=int, default=1024)
    parser.add_argument("--num_tokens", type=int, default=128, help="Any2PointConfig.num_tokens (3 stages: N >= 4T)")
    parser.add_argument("--num_neighbors", type=int, default=Any2PointConfig.num_neighbors)
    parser.add_argument("--stage_widths", type=int, nargs=3, default=None, help="default: Any2PointConfig's")


def step_config(args: argparse.Namespace) -> Any2PointConfig:
    """The Any2Point config of the timed step, from `add_step_arguments`'s flags."""
    widths = {"stage_widths": args.stage_widths} if args.stage_widths else {}
    return Any2PointConfig(num_labels=40, num_tokens=args.num_tokens, num_neighbors=args.num_neighbors, **widths)


def add_compile_embedder_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile_embedder",
        default="yes",
        choices=("yes", "no"),
        help="compile the embedder's per-neighbour work, as CPU training does from 1024 points on",
    )


def add_keep_memory_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep_freed_memory",
        default="yes",
        choices=("yes", "no"),
        help="keep_freed_memory() before measuring on the CPU, as CPU training does (no page faults for large tensors)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--matmul_size", type=int, default=2048, help="n of the n × n matmuls that measure the peak")
    parser.add_argument("--min_run_time", type=float, default=3.0, help="seconds of timing per measured step kind")
    parser.add_argument("--rounds", type=int, default=3, help="turns bare and Any2Point take; the median is over them")
    parser.add_argument("--breakdown_steps", type=int, default=3, help="hooked steps averaged for the time shares")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--attn_implementation",
        default="eager",
        choices=("eager", "sdpa"),
        help="backbone attention, for both models; eager is what training on the CPU uses",
    )
    add_compile_embedder_argument(parser)
    add_keep_memory_argument(parser)
    parser.add_argument("--quick", action="store_true", help=f"small sizes for smoke tests: {QUICK}")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:  # quick sizes become the defaults; flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


# ------------------------------------------------------------------------------------------------ timing


def autocast(precision: str) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def matmul_peak(size: int, dtype: torch.dtype, args: argparse.Namespace) -> dict[str, float]:
    """Best GFLOP/s of an n × n × n matmul: the ceiling that model steps are compared with."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    timer = Timer("a @ b", globals={"a": a, "b": b}, num_threads=args.threads)
    timer.timeit(1)
    best = min(timer.blocked_autorange(min_run_time=args.min_run_time).times)
    return {"size": size, "best_ms": best * 1e3, "gflops": 2 * size**3 / best / 1e9}


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul-class FLOPs of one call (forward and, where `fn` runs it, backward), CPU attention included."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------ models


def build_backbone(name: str) -> BertModel:
    if name == "tiny":
        torch.manual_seed(0)
        return BertModel(BertConfig(**TINY_BERT)).eval()
    from benchmarks.real_backbones import load_minilm

    return load_minilm()


def cpu_training_model(
    args: argparse.Namespace, compile_pooling: bool, compile_blocks: bool
) -> tuple[nn.Module, BertModel, Any2PointConfig]:
    """A peft model in train mode set up as CPU training sets it up (eager attention, seeded adapter weights), with
    the embedder's pooling and the blocks compiled or not; `args` gives backbone and embedder shape."""
    backbone = build_backbone(args.backbone)
    backbone.set_attn_implementation("eager")  # what training uses on the CPU
    torch.manual_seed(0)  # the same adapter weights in every model built here
    config = step_config(args)
    model = get_peft_model(backbone, config).train()
    if compile_pooling:
        model.base_model.any2point["default"].embedder.compile_pooling()
    if compile_blocks:
        model.base_model.compile_blocks()
    return model, backbone, config


def parameter_counts(peft_model: nn.Module, backbone: nn.Module) -> dict[str, Any]:
    """Trainable and total parameters, the total without the token-embedding table, and the adapter file size.

    Point inputs never read the word-embedding table, yet it is a large share of a language model's weights, so the
    trainable share is given against both totals.
    """
    modules = peft_model.base_model.any2point["default"]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    word_embeddings = backbone.get_input_embeddings().weight.numel()
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        file_bytes = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {
        "hidden_size": backbone.config.hidden_size,
        "num_layers": backbone.config.num_hidden_layers,
        "trainable": trainable,
        "trainable_by_part": {
            "embedder": sum(p.numel() for p in modules.embedder.parameters()),
            "adapters": sum(p.numel() for p in modules.adapters.parameters()),
            "cls_norm_head": modules.cls_token.numel()
            + sum(p.numel() for part in (modules.norm, modules.head) for p in part.parameters()),
        },
        "total": total,
        "word_embeddings": word_embeddings,
        "total_without_word_embeddings": total - word_embeddings,
        "trainable_percent": 100 * trainable / total,
        "trainable_percent_without_word_embeddings": 100 * trainable / (total - word_embeddings),
        "adapter_file_bytes": file_bytes,
    }


def bert_base_counts() -> dict[str, Any]:
    """Counts for a 768-wide 12-layer BERT; built on the meta device and left uninitialised, since only shapes count."""
    with torch.device("meta"):
        backbone = BertModel(BertConfig())
    backbone.to_empty(device="cpu")
    return parameter_counts(get_peft_model(backbone, Any2PointConfig(num_labels=40)), backbone)


# ------------------------------------------------------------------------------------------------ steps


Phases = dict[str, tuple[float, float]]  # phase -> (start, end) in time.perf_counter() seconds


def train_step(loss_fn: Callable[[], Tensor], optimizer: torch.optim.Optimizer, precision: str) -> Phases:
    """One training step; returns when its forward, backward and optimizer phases started and ended."""
    start = time.perf_counter()
    with autocast(precision):
        loss = loss_fn()
    forward_end = time.perf_counter()
    loss.backward()
    backward_end = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "forward": (start, forward_end),
        "backward": (forward_end, backward_end),
        "optimizer": (backward_end, time.perf_counter()),
    }


def inference_step(forward: Callable[[], object], precision: str) -> Phases:
    start = time.perf_counter()
    with torch.no_grad(), autocast(precision):
        forward()
    return {"forward": (start, time.perf_counter())}


def make_steps(
    peft_model: nn.Module, backbone: BertModel, config: Any2PointConfig, args: argparse.Namespace
) -> dict[tuple[str, str, str], Callable[[], Phases]]:
    """Step functions keyed by (model, mode, precision), model "bare" or "any2point"."""
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(args.batch_size, args.num_points, 3, generator=generator) * 2 - 1
    labels = torch.randint(0, config.num_labels, (args.batch_size,), generator=generator)
    states = torch.randn(args.batch_size, 1 + config.num_tokens, backbone.config.hidden_size, generator=generator)
    bare_input = nn.Parameter(states.clone())  # the only trainable tensor of the bare step: gradient to the inputs
    any2point_optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05
    )
    bare_optimizer = torch.optim.AdamW([bare_input], lr=5e-4, weight_decay=0.05)

    def any2point_loss() -> Tensor:
        return peft_model(points=points, labels=labels).loss

    def bare_loss() -> Tensor:
        # The shared backbone follows the peft model's train mode: run it as Any2Point runs its blocks, or the bare
        # step pays for dropout the Any2Point step skips (MiniLM, bf16, 2 cores: 1.1 s against 0.46 s).
        with backbone_dropout_mode(backbone, config.backbone_dropout):
            return backbone(inputs_embeds=bare_input).last_hidden_state.float().square().mean()

    steps = {}
    for precision in PRECISIONS:
        steps["bare", "inference", precision] = lambda p=precision: inference_step(
            lambda: backbone(inputs_embeds=states), p
        )
        steps["any2point", "inference", precision] = lambda p=precision: inference_step(
            lambda: peft_model(points=points), p
        )
        steps["bare", "train", precision] = lambda p=precision: train_step(bare_loss, bare_optimizer, p)
        steps["any2point", "train", precision] = lambda p=precision: train_step(any2point_loss, any2point_optimizer, p)
    return steps


# ------------------------------------------------------------------------------------------------ breakdown


class PartClock:
    """Forward and backward wall time of named parts of a model, from module and tensor hooks.

    A module's forward runs between its forward pre-hook and hook. In backward, a hook on its output fires when the
    gradient reaches the module and a hook on its input when the gradient leaves it. A module whose input needs no
    gradient (the embedder, fed raw points) is the last one backward reaches: its backward ends where the backward
    call does, which `finish(end)` is told.
    """

    def __init__(self) -> None:
        self.forward: dict[str, float] = defaultdict(float)
        self.backward: dict[str, float] = defaultdict(float)
        self._forward_start: dict[int, float] = {}
        self._backward_start: dict[int, tuple[str, float]] = {}

    def watch(self, part: str, module: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        key = id(module)

        def backward_end(grad: Tensor) -> None:
            name, start = self._backward_start.pop(key)
            self.backward[name] += time.perf_counter() - start

        def backward_start(grad: Tensor) -> None:
            self._backward_start[key] = (part, time.perf_counter())

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if isinstance(args[0], Tensor) and args[0].requires_grad:
                args[0].register_hook(backward_end)
            self._forward_start[key] = time.perf_counter()

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.forward[part] += time.perf_counter() - self._forward_start.pop(key)
            first = output[0] if isinstance(output, (tuple, list)) else output
            if first.requires_grad:
                first.register_hook(backward_start)

        return [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(hook)]

    def timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with its wall time added to the forward time of `part` (for functions, which take no hooks)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.forward[part] += time.perf_counter() - start

        return wrapper

    def finish(self, end: float) -> None:
        for part, start in self._backward_start.values():
            self.backward[part] += end - start
        self._backward_start.clear()


@contextlib.contextmanager
def clocked(peft_model: nn.Module) -> Iterator[PartClock]:
    """Hooks and timed wrappers on every part of the Any2Point forward, removed on exit."""
    tuner = peft_model.base_model
    modules = tuner.any2point["default"]
    spec = tuner.backbone_spec
    clock = PartClock()
    watched = [(EMBEDDER, modules.embedder), ("head", modules.norm), ("head", modules.head)]
    watched += [("backbone blocks", block) for block in [spec.input_norm, *spec.blocks] if block is not None]
    watched += [("adapters", adapter) for adapter in modules.adapters]
    with contextlib.ExitStack() as stack:
        for part, module in watched:
            for handle in clock.watch(part, module):
                stack.callback(handle.remove)
        for name, part in EMBEDDER_KERNELS.items():
            timed = clock.timed(part, getattr(peft_any2point.embedder, name))
            stack.enter_context(mock.patch.object(peft_any2point.embedder, name, timed))
        position = clock.timed("position encoding", tuner._position_encoding)
        stack.enter_context(mock.patch.object(tuner, "_position_encoding", position))
        geometry = clock.timed("adapter geometry", LocalGeometry.from_projection)
        stack.enter_context(mock.patch.object(LocalGeometry, "from_projection", staticmethod(geometry)))
        yield clock


def breakdown(peft_model: nn.Module, step: Callable[[], Phases], steps: int) -> dict[str, Any]:
    """Mean ms per step of each part (forward, backward) and its share of the hooked steps' wall time.

    "other" is what no part covers: input checks, concatenating the class token, the loss, autograd bookkeeping.
    """
    step()  # warm-up outside the clock
    phases = dict.fromkeys(("forward", "backward", "optimizer"), 0.0)
    with clocked(peft_model) as clock:
        for _ in range(steps):
            marks = step()
            for phase, (start, end) in marks.items():
                phases[phase] += end - start
            clock.finish(end=marks.get("backward", marks["forward"])[1])
    for part in EMBEDDER_KERNELS.values():  # they run inside the embedder's forward
        clock.forward[EMBEDDER] -= clock.forward[part]
    seconds = {part: {"forward": clock.forward[part], "backward": clock.backward[part]} for part in PARTS}
    seconds["optimizer"] = {"optimizer": phases["optimizer"]}
    seconds["other"] = {
        "forward": phases["forward"] - sum(clock.forward.values()),
        "backward": phases["backward"] - sum(clock.backward.values()),
    }
    total = sum(phases.values())
    parts = {
        part: {
            **{f"{phase}_ms": value * 1e3 / steps for phase, value in times.items()},
            "ms": sum(times.values()) * 1e3 / steps,
            "share": sum(times.values()) / total,
        }
        for part, times in seconds.items()
    }
    return {"step_ms": total * 1e3 / steps, "steps": steps, "parts": parts}


# ------------------------------------------------------------------------------------------------ report


def geometry_backends(
    embedder: peft_any2point.embedder.PointEmbedder, num_points: int, device: str = "cpu"
) -> list[str]:
    """What FPS and kNN run in each embedder stage (`backend=None` depends on the cloud size), for the report."""
    sizes = [num_points, *embedder.centres_per_stage[:-1]]
    return [
        f"{size} -> {centres}: fps {default_backend('fps', device, 1, size)}, "
        f"knn {default_backend('knn', device, stage.num_neighbors, size)}"
        for size, centres, stage in zip(sizes, embedder.centres_per_stage, embedder.stages, strict=True)
    ]


def markdown(result: dict[str, Any]) -> str:
    meta, peak = result["meta"], result["peak"]
    lines = [
        f"Any2Point vs bare backbone on {meta['machine']} ({meta['threads']} torch threads, {meta['cpu_count']} cores, "
        f"load average {meta['load_average_before']} before / {meta['load_average_after']} after), torch "
        f"{meta['torch']}, {meta['date']}{' (--quick)' if meta['quick'] else ''}. Backbone {meta['backbone']}, "
        f"B={meta['batch_size']} clouds × N={meta['num_points']} points → 1+{meta['num_tokens']} tokens, embedder "
        f"k={meta['num_neighbors']} neighbours and stage widths {meta['stage_widths']}, "
        f"{meta['attn_implementation']} attention, embedder pooling compiled: {meta['compile_embedder']}, freed memory "
        f"kept (`keep_freed_memory`): {'yes' if meta.get('keep_freed_memory') else 'no'}, geometry "
        f"backends per stage: {'; '.join(meta.get('geometry_backends', ['not recorded']))}. Matmul peak "
        f"(n={peak['fp32']['size']}, best block): fp32 {peak['fp32']['gflops']:.0f} GFLOP/s, bf16 "
        f"{peak['bf16']['gflops']:.0f} GFLOP/s.",
        "",
        "Bare: `backbone(inputs_embeds=...)` on the same B × (1+T) states; its training step keeps the blocks frozen "
        "and, like Any2Point's, without dropout, and sends the gradient to the inputs (AdamW on the input tensor). Any2Point: `peft_model(points=...)`, "
        "training with labels + backward + AdamW on the trainable parameters. Median of interleaved blocks; vs bare = "
        "Any2Point samples/s ÷ bare samples/s; "
        "FLOPs = matmul-class ops (FlopCounterMode; FPS/kNN/gathers count 0); % of peak against the step's precision.",
        "",
        "| model | step | precision | ms/step | samples/s | vs bare | GFLOP/step | GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["steps"]:
        ratio = f"{row['throughput_vs_bare']:.2f}×" if row["model"] == "any2point" else "—"
        lines.append(
            f"| {row['model']} | {row['mode']} | {row['precision']} | {row['median_ms']:.1f} | "
            f"{row['samples_per_s']:.1f} | {ratio} | {row['flops'] / 1e9:.2f} | {row['achieved_gflops']:.1f} | "
            f"{100 * row['fraction_of_peak']:.1f}% |"
        )
    kinds = list(result["breakdown"])
    lines += [
        "",
        "Where Any2Point's step time goes (ms per step, share; module hooks, forward + backward):",
        "",
        "| part | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for part in result["breakdown"][kinds[0]]["parts"]:
        cells = [result["breakdown"][kind]["parts"][part] for kind in kinds]
        lines.append(f"| {part} | " + " | ".join(f"{c['ms']:.1f} ({100 * c['share']:.0f}%)" for c in cells) + " |")
    lines.append("| hooked step | " + " | ".join(f"{result['breakdown'][k]['step_ms']:.1f}" for k in kinds) + " |")
    lines += [
        "",
        "| backbone | trainable (embedder / adapters / cls+norm+head) | total | without word embeddings | "
        "trainable % of total / without | adapter file |",
        "|---|---|---|---|---|---|",
    ]
    for name, counts in result["parameters"].items():
        parts = " / ".join(f"{n / 1e6:.3f}M" for n in counts["trainable_by_part"].values())
        lines.append(
            f"| {name} | {counts['trainable'] / 1e6:.3f}M ({parts}) | {counts['total'] / 1e6:.2f}M | "
            f"{counts['total_without_word_embeddings'] / 1e6:.2f}M | {counts['trainable_percent']:.2f}% / "
            f"{counts['trainable_percent_without_word_embeddings']:.2f}% | "
            f"{counts['adapter_file_bytes'] / 2**20:.2f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = args.keep_freed_memory == "yes" and keep_freed_memory()
    config = step_config(args)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": round(os.getloadavg()[0], 2),
        "quick": args.quick,
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "num_points": args.num_points,
        "num_tokens": args.num_tokens,
        "num_neighbors": config.num_neighbors,
        "stage_widths": config.stage_widths,
        "min_run_time_s": args.min_run_time,
        "rounds": args.rounds,
        "attn_implementation": args.attn_implementation,
        "compile_embedder": args.compile_embedder,
        "keep_freed_memory": kept,
    }
    peak = {precision: matmul_peak(args.matmul_size, DTYPES[precision], args) for precision in PRECISIONS}
    print("matmul peak GFLOP/s:", {precision: round(value["gflops"]) for precision, value in peak.items()}, flush=True)

    backbone = build_backbone(args.backbone)
    backbone.set_attn_implementation(args.attn_implementation)
    peft_model = get_peft_model(backbone, config)
    meta["geometry_backends"] = geometry_backends(peft_model.base_model.any2point["default"].embedder, args.num_points)
    steps = make_steps(peft_model, backbone, config, args)
    flops = {}  # counted eagerly: compiling fuses element-wise work only, which counts zero FLOPs either way
    for mode in MODES:
        peft_model.train(mode == "train")
        flops[mode] = {model: count_flops(steps[model, mode, "fp32"]) for model in ("bare", "any2point")}
    if args.compile_embedder == "yes":
        peft_model.base_model.any2point["default"].embedder.compile_pooling()

    rows, kinds = [], {}
    for mode in MODES:
        peft_model.train(mode == "train")  # the backbone is shared: bare steps run in the same mode
        for precision in PRECISIONS:
            calls = {model: steps[model, mode, precision] for model in ("bare", "any2point")}
            times = interleaved_median(calls, args.min_run_time, args.rounds, args.threads)
            by_model = {
                model: {
                    "model": model,
                    "mode": mode,
                    "precision": precision,
                    "median_ms": seconds * 1e3,
                    "runs": runs,
                    "samples_per_s": args.batch_size / seconds,
                    "flops": flops[mode][model],
                    "achieved_gflops": flops[mode][model] / seconds / 1e9,
                    "fraction_of_peak": flops[mode][model] / seconds / 1e9 / peak[precision]["gflops"],
                }
                for model, (seconds, runs) in times.items()
            }
            bare, any2point = by_model["bare"], by_model["any2point"]
            any2point["throughput_vs_bare"] = any2point["samples_per_s"] / bare["samples_per_s"]
            any2point["time_vs_bare"] = any2point["median_ms"] / bare["median_ms"]
            rows += [bare, any2point]
            print(
                f"{mode} {precision}: bare {bare['median_ms']:.1f} ms, any2point {any2point['median_ms']:.1f} ms",
                flush=True,
            )
            kinds[f"{mode} {precision}"] = breakdown(
                peft_model, steps["any2point", mode, precision], args.breakdown_steps
            )

    peft_model.eval()
    parameters = {
        args.backbone: parameter_counts(peft_model, backbone),
        "bert-base (random, 768×12)": bert_base_counts(),
    }
    meta["load_average_after"] = round(os.getloadavg()[0], 2)
    result = {"meta": meta, "peak": peak, "steps": rows, "breakdown": kinds, "parameters": parameters}
    stem = "speed_quick" if args.quick else "speed"
    text = markdown(result)
    atomic_write_text(args.output_dir / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.output_dir / f"{stem}.md", text)
    print(text, end="")


if __name__ == "__main__":
    main()
