"""Model card contents and the upload path, against a mocked `HfApi` (no network)."""

from unittest import mock

import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects

from peft_any2point.hub import make_model_card, push_adapter_to_hub


BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METRICS = {"accuracy": 0.9125, "mean_class_accuracy": 0.875, "per_class_accuracy": [1.0, 0.75], "confusion_matrix": []}
COMMIT_URL = "https://huggingface.co/me/a2p-minilm/commit/0123abc"


@pytest.fixture
def adapter_folder(tmp_path):
    """A training output folder: the adapter, a plot, and things that must stay home."""
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "ANY2POINT"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0" * 2_500_000)
    (tmp_path / "confusion_matrix.png").write_bytes(b"\x89PNG")
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "adapter_model.safetensors").write_bytes(b"\0")
    (tmp_path / "checkpoint-500" / "curves.png").write_bytes(b"\x89PNG")
    (tmp_path / "optimizer.pt").write_bytes(b"\0")
    (tmp_path / "all_results.json").write_text("{}")
    return tmp_path


@pytest.fixture
def api():
    """An HfApi whose repo creation resolves the namespace, as the real one does for a bare name."""
    fake = mock.create_autospec(HfApi, instance=True)
    fake.create_repo.return_value = RepoUrl("https://huggingface.co/me/a2p-minilm")
    fake.upload_folder.return_value = mock.Mock(commit_url=COMMIT_URL)
    return fake


def test_card_front_matter_declares_peft_the_base_model_and_the_results():
    card = ModelCard(make_model_card(BASE_MODEL, "me/a2p-minilm", dataset="modelnet40", metrics=METRICS))
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["base_model"] == BASE_MODEL
    assert {"any2point", "point-cloud-classification", "peft"} <= set(data["tags"])
    assert data["datasets"] == ["modelnet40"]
    assert data["metrics"] == ["accuracy", "mean_class_accuracy"]  # scalars only
    results = {
        (r.task_type, r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results
    }
    assert results == {
        ("point-cloud-classification", "modelnet40", "test", "accuracy"): 0.9125,
        ("point-cloud-classification", "modelnet40", "test", "mean_class_accuracy"): 0.875,
    }


def test_card_body_says_to_import_the_plugin_before_loading_and_gives_sizes():
    text = make_model_card(
        BASE_MODEL,
        "me/a2p-minilm",
        metrics=METRICS,
        trainable_params=912_000,
        total_params=23_600_000,
        adapter_size_bytes=3_650_000,
    )
    body = ModelCard(text).text
    assert body.index("import peft_any2point") < body.index("PeftModel.from_pretrained")
    assert f'AutoModel.from_pretrained("{BASE_MODEL}")' in body
    assert 'PeftModel.from_pretrained(base, "me/a2p-minilm")' in body
    assert "Trainable parameters: 912,000 (3.86% of 23,600,000 parameters)" in body
    assert "Adapter file size: 3.65 MB" in body
    assert "| Overall accuracy (OA) | 0.9125 |" in body
    assert "model-index" not in ModelCard(text).content  # results need a dataset to be indexed


def test_push_uploads_only_the_adapter_card_and_plots(adapter_folder, api):
    url = push_adapter_to_hub(
        adapter_folder,
        "a2p-minilm",
        base_model=BASE_MODEL,
        dataset="modelnet40",
        metrics=METRICS,
        private=True,
        token="hf_test",
        api=api,
    )
    assert url == COMMIT_URL
    api.create_repo.assert_called_once_with("a2p-minilm", private=True, exist_ok=True, token="hf_test")
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "me/a2p-minilm" and upload["token"] == "hf_test"
    assert upload["folder_path"] == adapter_folder
    files = sorted(str(p.relative_to(adapter_folder)) for p in adapter_folder.rglob("*") if p.is_file())
    uploaded = set(
        filter_repo_objects(files, allow_patterns=upload["allow_patterns"], ignore_patterns=upload["ignore_patterns"])
    )
    assert uploaded == {"adapter_config.json", "adapter_model.safetensors", "README.md", "confusion_matrix.png"}


def test_push_writes_the_card_with_the_resolved_repo_id_and_file_size(adapter_folder, api):
    push_adapter_to_hub(adapter_folder, "a2p-minilm", base_model=BASE_MODEL, metrics=METRICS, api=api)
    card = ModelCard.load(adapter_folder / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == BASE_MODEL
    assert 'PeftModel.from_pretrained(base, "me/a2p-minilm")' in card.text
    assert "Adapter file size: 2.50 MB" in card.text


def test_push_refuses_a_folder_without_an_adapter_before_touching_the_hub(tmp_path, api):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks \['adapter_model\.safetensors'\]; expected the output of"):
        push_adapter_to_hub(tmp_path, "me/a2p", base_model=BASE_MODEL, api=api)
    api.create_repo.assert_not_called()
    assert not (tmp_path / "README.md").exists()
