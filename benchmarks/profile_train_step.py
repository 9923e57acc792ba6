"""Where a training step of the paper recipe spends its time on the current device, and whether the host keeps up.

On a GPU a step is cheap in FLOPs (MiniLM, 32 clouds of 1024 points, 129 tokens), so its speed is set by how fast
the host launches kernels, not by the chip. This script measures, in one run:

- step time of the training step `examples/train_modelnet.py` runs (augmentation, forward under autocast, backward,
  gradient clipping, AdamW), for each batch size asked for, and of the bare backbone on the same tokens;
- how long the host takes to issue a step against how long the step takes once the device has finished it: when the
  two are close the step is launch-bound and a faster chip would not help;
- a `torch.profiler` capture: kernels launched per step, device-busy time per step, the parts of the model
  (embedder, adapters, blocks, head; forward only) by host and device time, and the top kernels and host ops;
- how fast the train DataLoader alone yields batches from the real data, when `--data_dir` is given.

The backbone has MiniLM's shape with random weights (speed does not depend on the values), so nothing needs to be
downloaded or carried. `python -m benchmarks.profile_train_step` writes `results/profile_<device>.{json,md}`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import BertConfig, BertModel

from benchmarks.bench_speed import TINY_BERT
from benchmarks.reporting import write_report
from peft_any2point import Any2PointConfig
from peft_any2point.model import backbone_dropout_mode
from peft_any2point.training import default_attention, load_train_test, make_dataloaders, train_augmentation


RESULTS = Path(__file__).parent / "results"
COMPILE = ("none", "blocks", "regions", "model")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
SHAPES = {
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "tiny": TINY_BERT,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(SHAPES), default="minilm", help="shape of the random BERT")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--num_points", type=int, default=1024)
    parser.add_argument("--num_tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 5 warm-up steps)")
    parser.add_argument("--profile_steps", type=int, default=5)
    parser.add_argument(
        "--compile",
        choices=COMPILE,
        default="none",
        help="blocks: compile_blocks(); regions: that and the embedder's pooling (compile_pooling); "
        "model: torch.compile(model, dynamic=False)",
    )
    parser.add_argument(
        "--compile_mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode of what --compile compiles; reduce-overhead replays each compiled region as a CUDA "
        "graph, one launch instead of its kernels, for a step that is host-bound on a GPU",
    )
    parser.add_argument("--data_dir", default=None, help="ModelNet40 folder: also time the DataLoader alone")
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, BertModel]:
    torch.manual_seed(0)
    backbone = BertModel(BertConfig(**SHAPES[args.backbone])).to(device).eval()
    if attention := default_attention(device):  # what training uses there
        backbone.set_attn_implementation(attention)
    model = get_peft_model(backbone, Any2PointConfig(num_labels=40, num_tokens=args.num_tokens))
    return model, backbone


def make_train_step(model: nn.Module, batch_size: int, args: argparse.Namespace, device: torch.device) -> Callable:
    """The training script's step on a fixed random batch, with its one host sync (the logged loss)."""
    generator = torch.Generator(device).manual_seed(0)
    points = torch.rand(batch_size, args.num_points, 3, device=device, generator=generator) * 2 - 1
    labels = torch.randint(0, 40, (batch_size,), device=device, generator=generator)
    augment = train_augmentation("modelnet40")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.05)
    model.train()

    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA-graph outputs of the last step may be overwritten now
        with torch.autocast(device.type, dtype=torch.bfloat16):
            output = model(points=augment(points, generator=generator), labels=labels, output_hidden_states=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad()
        output.loss.item()

    return step


def make_bare_step(backbone: BertModel, batch_size: int, args: argparse.Namespace, device: torch.device) -> Callable:
    """Frozen blocks on the same number of tokens, gradient to the inputs: what Any2Point adds to is this.

    The training step leaves the backbone in train mode; its blocks run without dropout here, as Any2Point runs them
    (`backbone_dropout=False`), or the bare step would pay for dropout that the Any2Point step skips.
    """
    states = torch.randn(batch_size, 1 + args.num_tokens, backbone.config.hidden_size, device=device)
    inputs = nn.Parameter(states)
    optimizer = torch.optim.AdamW([inputs], lr=5e-4)

    def step() -> None:
        with backbone_dropout_mode(backbone, False), torch.autocast(device.type, dtype=torch.bfloat16):
            loss = backbone(inputs_embeds=inputs).last_hidden_state.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    return step


def time_step(step: Callable[[], None], steps: int, device: torch.device) -> dict[str, float]:
    """Median ms per step with the device drained, and the host's own time to issue it (before the drain)."""
    for _ in range(5):
        step()
    synchronize(device)
    total, issue = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        issued = time.perf_counter()
        synchronize(device)
        total.append(time.perf_counter() - start)
        issue.append(issued - start)
    return {"step_ms": 1e3 * statistics.median(total), "host_issue_ms": 1e3 * statistics.median(issue)}


@contextlib.contextmanager
def labelled_parts(model: nn.Module) -> Iterator[None]:
    """A profiler range around the forward of each part, so the capture can be read by part."""
    modules = model.base_model.any2point["default"]
    spec = model.base_model.backbone_spec
    parts = [("embedder", modules.embedder), ("head", modules.head)]
    parts += [("blocks", block) for block in spec.blocks] + [("adapters", adapter) for adapter in modules.adapters]
    handles, open_ranges = [], []

    def enter(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any) -> None:
            open_ranges.append(record_function(f"part: {name}").__enter__())

        return hook

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    for name, module in parts:
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def profile_step(
    model: nn.Module | None, step: Callable[[], None], steps: int, device: torch.device
) -> dict[str, Any]:
    """Capture `steps` steps; with `model` (not under torch.compile, whose guards hooks would break) by part too."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    labels = labelled_parts(model) if model is not None else contextlib.nullcontext()
    with labels, profile(activities=activities) as capture:
        for _ in range(steps):
            step()
        synchronize(device)
    events = capture.key_averages()
    # Annotated ranges (the parts, the optimizer step) show up on both sides; kernels only on the device.
    host_keys = {e.key for e in events if e.device_type.name == "CPU"}
    kernels = [e for e in events if e.device_type.name == "CUDA" and e.key not in host_keys]
    host_ops = [e for e in events if e.device_type.name == "CPU" and not e.key.startswith(("part: ", "aten::item"))]
    parts = {
        e.key.removeprefix("part: "): {
            "calls_per_step": e.count / steps,
            "host_ms": e.cpu_time_total / 1e3 / steps,
            "device_ms": e.device_time_total / 1e3 / steps,
        }
        for e in events
        if e.key.startswith("part: ") and e.device_type.name == "CPU"
    }
    return {
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "device_busy_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
        "parts_forward": parts,
        "top_kernels": [
            {"name": e.key[:90], "calls_per_step": e.count / steps, "ms": e.self_device_time_total / 1e3 / steps}
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
        ],
        "top_host_ops": [
            {"name": e.key[:90], "calls_per_step": e.count / steps, "self_ms": e.self_cpu_time_total / 1e3 / steps}
            for e in sorted(host_ops, key=lambda e: -e.self_cpu_time_total)[:12]
        ],
    }


def loader_speed(data_dir: str, batch_size: int, batches: int) -> dict[str, float]:
    """How fast the train DataLoader yields batches in the main process (no workers): the host time a step waits."""
    data = load_train_test("modelnet40", data_dir, 1024, None, None, 0)
    loader = iter(make_dataloaders(data, batch_size, 0)[0])
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "clouds_per_s": batches * batch_size / seconds,
        "ms_per_batch": 1e3 * seconds / batches,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Training step of the paper recipe on {result['device_name']} ({result['backbone']}-shaped random backbone, "
        f"{result['num_points']} points, {result['num_tokens']} tokens, bf16 autocast"
        f", compiled: {result['compiled']}, mode {result['compile_mode']}), {result['date']}.",
        "",
        "| batch | step | clouds/s | host issue time | bare backbone step | kernels / step | device busy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["batches"]:
        capture = row.get("profile", {})
        busy = f"{capture['device_busy_ms']:.1f} ms" if "device_busy_ms" in capture else "—"
        kernels = f"{capture['kernels_per_step']:.0f}" if "kernels_per_step" in capture else "—"
        lines.append(
            f"| {row['batch_size']} | {row['step_ms']:.1f} ms | {row['clouds_per_s']:.0f} | {row['host_issue_ms']:.1f} ms"
            f" | {row['bare']['step_ms']:.1f} ms | {kernels} | {busy} |"
        )
    if "loader" in result:
        loader = result["loader"]
        lines += [
            "",
            f"Train DataLoader alone: {loader['clouds_per_s']:.0f} clouds/s ({loader['ms_per_batch']:.1f} ms "
            f"per batch of {loader['batch_size']}).",
        ]
    for row in result["batches"]:
        if "profile" not in row:
            continue
        capture = row["profile"]
        if capture["parts_forward"]:
            lines += [
                "",
                f"Batch {row['batch_size']}, forward by part (per step):",
                "",
                "| part | calls | host ms | device ms |",
                "| --- | --- | --- | --- |",
            ]
            lines += [
                f"| {name} | {p['calls_per_step']:.0f} | {p['host_ms']:.1f} | {p['device_ms']:.1f} |"
                for name, p in capture["parts_forward"].items()
            ]
        lines += ["", f"Batch {row['batch_size']}:", "", "| top kernel | calls | ms |", "| --- | --- | --- |"]
        lines += [f"| `{k['name']}` | {k['calls_per_step']:.0f} | {k['ms']:.2f} |" for k in capture["top_kernels"]]
        lines += ["", "| top host op | calls | self ms |", "| --- | --- | --- |"]
        lines += [
            f"| `{k['name']}` | {k['calls_per_step']:.0f} | {k['self_ms']:.2f} |" for k in capture["top_host_ops"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, backbone = build(args, device)
    options = {"mode": args.compile_mode}
    # Static shapes: the embedder stages share one forward at three sizes; size-generic kernels took 11 s a CPU step.
    stepped = torch.compile(model, dynamic=False, **options) if args.compile == "model" else model
    if args.compile in ("blocks", "regions"):
        model.base_model.compile_blocks(**options)
    if args.compile == "regions":
        model.base_model.any2point["default"].embedder.compile_pooling(**options)
    result: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "backbone": args.backbone,
        "num_points": args.num_points,
        "num_tokens": args.num_tokens,
        "compiled": args.compile,
        "compile_mode": args.compile_mode,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batches": [],
    }
    compiled = [f"compiled_{args.compile}"] if args.compile != "none" else []
    if compiled and args.compile_mode != "default":
        compiled.append(args.compile_mode.replace("-", "_"))
    stem = "_".join(["profile", device.type, args.backbone, *compiled])
    if args.data_dir:
        result["loader"] = loader_speed(args.data_dir, args.batch_sizes[0], 50)
    for batch_size in args.batch_sizes:
        step = make_train_step(stepped, batch_size, args, device)
        row = {"batch_size": batch_size, **time_step(step, args.steps, device)}
        row["clouds_per_s"] = 1e3 * batch_size / row["step_ms"]
        row["bare"] = time_step(make_bare_step(backbone, batch_size, args, device), args.steps, device)
        row["profile"] = profile_step(None if args.compile != "none" else model, step, args.profile_steps, device)
        result["batches"].append(row)
        print(row["batch_size"], f"{row['step_ms']:.1f} ms", f"{row['clouds_per_s']:.0f} clouds/s", flush=True)
        write_report(args.output_dir, stem, result, markdown(result), echo=batch_size == args.batch_sizes[-1])
    return result


if __name__ == "__main__":
    main()
