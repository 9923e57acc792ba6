"""Baselines to compare Any2Point with on the same data and budget (issue #5): other uses of the same backbone.

A baseline starts from an Any2Point model without adapters (`get_peft_model(backbone,
Any2PointConfig(use_adapter=False, ...))`), so the point tokens, their virtual-projection position encoding, the
final norm and the head are Any2Point's own, and changes only what happens in the backbone's blocks:

- `lora`: peft's own LoRA on every linear layer of the frozen blocks (attention and MLP, whatever the architecture
  names them);
- `full`: full fine-tuning, every block parameter (and the input norm) trains;
- `embedder-only`: no blocks at all, the tokens go from the embedder straight to the final norm and the head.

Every variant runs the blocks the same way (`Any2PointConfig.backbone_dropout`, off by default), so that only what
trains differs. The backbone's position table stays frozen in all of them: the virtual projection reads it detached.
A baseline is no peft adapter: the training script saves everything that trains under `WEIGHTS_FILE`
(`training.save_trainable_state`).
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, inject_adapter_in_model
from torch import nn

from peft_any2point.backbones import BackboneSpec


BASELINES = ("lora", "full", "embedder-only")
WEIGHTS_FILE = "trainable_weights.safetensors"


def make_baseline(model: PeftModel, baseline: str, lora_rank: int = 2) -> None:
    """Turn an Any2Point model without adapters into `baseline`, in place; build the optimizer afterwards."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    tuner = model.base_model
    if tuner.peft_config[tuner.active_adapter].use_adapter:
        raise ValueError("a baseline replaces the adapters: build it from Any2PointConfig(use_adapter=False)")
    spec = tuner.backbone_spec
    if baseline == "lora":
        add_lora(spec.blocks, lora_rank)
    elif baseline == "full":
        unfreeze_blocks(spec)
    else:
        del spec.blocks[:]  # in place: the tuner runs this very list, now empty


def add_lora(blocks: nn.ModuleList, rank: int) -> None:
    """Inject peft's LoRA into every `nn.Linear` of `blocks`, with scale lora_alpha / r = 1 (peft's default ratio).

    Injecting into the block list rather than the whole backbone targets exactly the layers Any2Point runs, and leaves
    the backbone's own `peft_config` (the Any2Point tuner's) untouched.
    """
    targets = [name for name, module in blocks.named_modules() if isinstance(module, nn.Linear)]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), blocks)


def unfreeze_blocks(spec: BackboneSpec) -> None:
    """Train every backbone weight the point forward runs through: the blocks and the input norm before them."""
    spec.blocks.requires_grad_(True)
    if spec.input_norm is not None:
        spec.input_norm.requires_grad_(True)
