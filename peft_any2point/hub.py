"""Share a trained Any2Point adapter on the Hugging Face Hub with a model card of our own.

`PeftModel.push_to_hub` writes a card that says `library_name: transformers` and cannot say how to load a plugin
method; here the card declares `library_name: peft`, the base model, the point-cloud task and its results
(a `model-index`, so the Hub shows them), and tells readers to `import peft_any2point` before loading.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCardData

from peft_any2point.io import atomic_write_text


PAPER_URL = "https://arxiv.org/abs/2404.07989"
TASK = "point-cloud-classification"
TAGS = ("any2point", TASK, "peft", "point-cloud", "3d")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What goes up: the adapter as `save_pretrained` writes it, the card and plots. Never checkpoints (full optimizer
# and RNG state, often larger than the adapter itself) or anything else lying in the output folder.
UPLOAD_PATTERNS = [*ADAPTER_FILES, "README.md", "*.png"]
IGNORE_PATTERNS = ["checkpoint*", "**/checkpoint*"]
DATASET_NAMES = {
    "modelnet40": "ModelNet40",
    "scanobjectnn": "ScanObjectNN (PB_T50_RS)",
    "synthetic": "Synthetic shapes",
}
METRIC_NAMES = {"accuracy": "Overall accuracy (OA)", "mean_class_accuracy": "Mean class accuracy (mAcc)"}


def make_model_card(
    base_model: str,
    repo_id: str,
    *,
    dataset: str | None = None,
    dataset_split: str = "test",
    metrics: Mapping[str, object] | None = None,
    trainable_params: int | None = None,
    total_params: int | None = None,
    adapter_size_bytes: int | None = None,
) -> str:
    """The README.md of an adapter repo: YAML front matter (with a `model-index` of the results) and a body.

    `base_model` should be a Hub id (the card links to it and readers load it by that name).

    `metrics` may be the whole output of the point-cloud metric: only its scalar entries (`accuracy`,
    `mean_class_accuracy`, ...) are reported. `total_params` is the total that `trainable_params` is a share of.
    """
    scalars = {key: float(value) for key, value in (metrics or {}).items() if isinstance(value, numbers.Real)}
    dataset_name = DATASET_NAMES.get(dataset, dataset) if dataset else None
    eval_results = [
        EvalResult(
            task_type=TASK,
            task_name="Point cloud classification",
            dataset_type=dataset,
            dataset_name=dataset_name,
            dataset_split=dataset_split,
            metric_type=key,
            metric_name=METRIC_NAMES.get(key, key),
            metric_value=value,
        )
        for key, value in (scalars if dataset else {}).items()
    ]
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        tags=list(TAGS),
        datasets=[dataset] if dataset else None,
        metrics=list(scalars) or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"An [Any2Point]({PAPER_URL}) adapter that turns the frozen `{base_model}` into a 3D point-cloud classifier"
        + (f", trained on {dataset_name}." if dataset_name else "."),
        "The backbone's weights are untouched: this repository holds only the 3D embedder, the guided adapters and",
        "the classification head.",
        "",
        *_results_section(scalars, dataset_name, dataset_split),
        *_size_section(trainable_params, total_params, adapter_size_bytes),
        "## How to use",
        "",
        "`import peft_any2point` first: it registers the Any2Point method with peft, without which",
        "`PeftModel.from_pretrained` does not know the `ANY2POINT` peft type.",
        "",
        "```python",
        "import torch",
        "import peft_any2point  # noqa: F401  (registers the method; import before loading)",
        "from peft import PeftModel",
        "from transformers import AutoModel",
        "",
        f'base = AutoModel.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}").eval()',
        "points = torch.rand(1, 1024, 3) * 2 - 1  # (batch, num_points, xyz), centred and scaled into the unit sphere",
        "with torch.no_grad():",
        "    predicted_class = model(points=points).logits.argmax(-1)",
        "```",
        "",
    ]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body)


def push_adapter_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str,
    dataset: str | None = None,
    metrics: Mapping[str, object] | None = None,
    trainable_params: int | None = None,
    total_params: int | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload Any2Point adapter",
    api: HfApi | None = None,
) -> str:
    """Write the model card into `folder` (the adapter's `save_pretrained` output), create the repo if needed and
    upload the adapter files, the card and PNG plots; return the commit URL.

    `api` is for tests and custom endpoints; by default a plain `HfApi()` (token from `token` or the login).
    """
    folder = Path(folder)
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {missing}; expected the output of `model.save_pretrained(folder)` (safetensors)"
        )
    api = api or HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id  # adds the namespace
    card = make_model_card(
        base_model,
        repo_id,
        dataset=dataset,
        metrics=metrics,
        trainable_params=trainable_params,
        total_params=total_params,
        adapter_size_bytes=(folder / "adapter_model.safetensors").stat().st_size,
    )
    atomic_write_text(folder / "README.md", card)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        allow_patterns=UPLOAD_PATTERNS,
        ignore_patterns=IGNORE_PATTERNS,
        token=token,
    )
    return commit.commit_url


def _results_section(scalars: Mapping[str, float], dataset_name: str | None, split: str) -> list[str]:
    if not scalars:
        return []
    where = f" on {dataset_name} ({split} split)" if dataset_name else ""
    rows = [f"| {METRIC_NAMES.get(key, key)} | {value:.4g} |" for key, value in scalars.items()]
    return [f"## Results{where}", "", "| metric | value |", "| --- | --- |", *rows, ""]


def _size_section(trainable_params: int | None, total_params: int | None, adapter_size_bytes: int | None) -> list[str]:
    lines = []
    if trainable_params is not None:
        share = (
            f" ({100 * trainable_params / total_params:.2f}% of {total_params:,} parameters)" if total_params else ""
        )
        lines.append(f"- Trainable parameters: {trainable_params:,}{share}")
    if adapter_size_bytes is not None:
        lines.append(f"- Adapter file size: {adapter_size_bytes / 1e6:.2f} MB")
    return ["## Size", "", *lines, ""] if lines else []
