"""Hub uploads, tested up to the network: what ``huggingface_hub.HfApi`` is handed, and that it loads back.

The network is cut (offline mode) and the ``HfApi`` calls that reach the Hub in an upload (``create_repo``,
``create_branch``, ``create_commit``; ``upload_folder`` for the Trainer) are replaced by recorders that keep the
bytes of every file in the commit. Reading the repo's existing card goes through ``hf_hub_download``,
which offline finds nothing (a new repo) unless a test stands in for it.
"""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from helpers import fresh_model, inputs_for
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_vision_lora import VisionLoraConfig, push_adapter_to_hub

# Offline, PEFT warns that it cannot look up the base model's config.json.
pytestmark = pytest.mark.filterwarnings("ignore:Unable to fetch remote file", "ignore:Could not find a config file")
MODEL_TYPE = "llava"
BASE_ID = "acme/tiny-llava"
REPO_ID = "someone/tiny-llava-vision-lora"
# Module-path markers of each component in the tiny LLaVA, written out by hand (not taken from the package).
COMPONENT_MARKERS = {
    "vision": "vision_tower",
    "projector": "multi_modal_projector",
    "language": "language_model",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # PEFT's save_pretrained looks up the base model's config.json on the Hub; no test here may reach the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub(monkeypatch):
    """Recording create_repo/create_commit; yields the list of recorded calls."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        commits.append({"create_repo": repo_id, **kwargs})
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = open(source, "rb").read() if isinstance(source, str) else bytes(source)
        commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"https://hub.test/{repo_id}/commit/1")

    def create_branch(self, repo_id, *, branch, **kwargs):
        commits.append({"create_branch": repo_id, "branch": branch, **kwargs})

    def upload_folder(self, *, repo_id, folder_path, **kwargs):  # the Trainer's upload
        paths = [p for p in Path(folder_path).rglob("*") if p.is_file()]
        commits.append(
            {
                "repo_id": repo_id,
                "files": {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in paths},
                **kwargs,
            }
        )
        return SimpleNamespace(commit_url=f"https://hub.test/{repo_id}/commit/1")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return commits


def _model():
    base = fresh_model(MODEL_TYPE)
    base.name_or_path = BASE_ID  # what from_pretrained sets; get_peft_model copies it into the adapter config
    config = VisionLoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, finetune_projector=True, component_r={"vision": 2}
    )
    return get_peft_model(base, config).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(MODEL_TYPE)).logits


def _trainable_per_component(model) -> dict[str, tuple[int, int]]:
    """(modules, LoRA parameters) per component, counted on the live model."""
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            component = next(c for c, marker in COMPONENT_MARKERS.items() if marker in name)
            params = sum(p.numel() for p in module.lora_A.parameters()) + sum(
                p.numel() for p in module.lora_B.parameters()
            )
            modules, total = counts.get(component, (0, 0))
            counts[component] = (modules + 1, total + params)
    return counts


def _table_rows(card_text: str) -> dict[str, list[str]]:
    rows = {}
    for line in card_text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in (*COMPONENT_MARKERS, "**total**"):
            rows[cells[0]] = cells[1:]
    return rows


def _write(files: dict[str, bytes], folder):
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


PUSHES = {
    "model.push_to_hub": lambda model, repo_id, **kwargs: model.push_to_hub(repo_id, **kwargs),
    "push_adapter_to_hub": push_adapter_to_hub,
}


@pytest.mark.parametrize("push", PUSHES.values(), ids=PUSHES.keys())
def test_push_uploads_weights_config_and_card(hub, tmp_path, push):
    model = _model()
    expected = _logits(model)
    push(model, REPO_ID, private=True)

    assert hub[0] == {"create_repo": REPO_ID, "private": True, "exist_ok": True}
    commit = hub[1]
    assert commit["repo_id"] == REPO_ID
    assert sorted(commit["files"]) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "vision_lora_config.json",
    ]
    # portable: plain LoRA for PEFT alone, the full config beside it (tests/test_portable.py loads both ways)
    assert json.loads(commit["files"]["adapter_config.json"])["peft_type"] == "LORA"
    assert json.loads(commit["files"]["vision_lora_config.json"])["component_r"] == {"vision": 2}

    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_ID
    assert {"vision-lora", "vision-lora-strategy:vision-projector-language", "lora"} <= set(card.data.tags)
    rows = _table_rows(card.text)
    for component, (modules, params) in _trainable_per_component(model).items():
        rank = "2" if component == "vision" else "4"
        assert rows[component] == [str(modules), rank, f"{params:,}"], component
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows["**total**"][-1] == f"{total:,}"
    # How to load, with and without the package, naming the repo.
    assert f'PeftModel.from_pretrained(base, "{REPO_ID}")' in card.text
    assert "import peft_vision_lora" in card.text
    assert "With PEFT alone" in card.text

    folder = _write(commit["files"], tmp_path / "downloaded")
    reloaded = PeftModel.from_pretrained(fresh_model(MODEL_TYPE), folder).eval()
    assert isinstance(reloaded.peft_config["default"], VisionLoraConfig)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-6)


def test_save_pretrained_writes_the_same_card(hub, tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "local", portable=True)  # what push_to_hub uploads
    model.push_to_hub(REPO_ID)
    local = ModelCard.load(tmp_path / "local" / "README.md")
    pushed = ModelCard(hub[1]["files"]["README.md"].decode())
    assert local.data.to_dict() == pushed.data.to_dict()
    # Only the loading snippets differ: a placeholder path locally, the repo id on the Hub.
    assert re.sub("path/to/adapter", REPO_ID, local.text) == pushed.text
    assert "<!-- Provide a quick summary" not in local.text  # PEFT's empty template was replaced


def test_user_text_in_the_card_survives_a_second_save(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "\n## Training data\n\nMy notes.\n")
    model.save_pretrained(tmp_path)
    text = readme.read_text()
    assert text.count("## Adapted components") == 1
    assert "My notes." in text


def test_push_to_hub_options_reach_the_hub(hub):
    model = _model()
    model.push_to_hub(
        REPO_ID,
        commit_message="first adapter",
        commit_description="trained on synthetic charts",
        revision="experiment",
        create_pr=True,
        tags=["charts", "lora"],
        max_shard_size="1GB",  # accepted as by transformers; an adapter is one file anyway
    )
    assert hub[1] == {"create_branch": REPO_ID, "branch": "experiment", "exist_ok": True}
    commit = hub[2]
    assert commit["commit_message"] == "first adapter"
    assert commit["commit_description"] == "trained on synthetic charts"
    assert commit["revision"] == "experiment" and commit["create_pr"] is True
    tags = ModelCard(commit["files"]["README.md"].decode()).data.tags
    assert {"charts", "lora", "vision-lora"} <= set(tags) and len(tags) == len(set(tags))


def test_push_to_hub_rejects_unknown_options(hub):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['safe_serialization'\]"):
        _model().push_to_hub(REPO_ID, safe_serialization=False)
    assert hub == []  # nothing was created


def test_push_to_hub_keeps_text_of_a_card_already_on_the_hub(hub, monkeypatch, tmp_path):
    # A repo whose card a user edited on the Hub (after a push with transformers' generic card).
    remote = tmp_path / "remote_README.md"
    remote.write_text("---\nlibrary_name: transformers\ntags:\n- charts\n---\n\n# My adapter\n\nTrained on charts.\n")
    asked = []

    def hf_hub_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(remote)

    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", hf_hub_download)
    model = _model()
    model.push_to_hub(REPO_ID)
    model.push_to_hub(REPO_ID)  # twice: our section is replaced, not repeated
    assert asked == [(REPO_ID, "README.md")] * 2
    card = ModelCard(hub[-1]["files"]["README.md"].decode())
    assert card.data.library_name == "peft" and {"charts", "vision-lora"} <= set(card.data.tags)
    assert card.text.count("Trained on charts.") == 1
    assert card.text.count("## Adapted components") == 1


def test_push_to_hub_of_other_peft_adapters_is_left_to_transformers(hub):
    from peft import LoraConfig

    # Only models holding a VISION_LORA adapter are handled by this package; a plain LoRA model keeps transformers'
    # behaviour exactly, generic card included.
    model = get_peft_model(fresh_model(MODEL_TYPE), LoraConfig(r=4, target_modules=["q_proj"]))
    model.push_to_hub(REPO_ID)
    files = hub[-1]["files"]
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert ModelCard(files["README.md"].decode()).data.library_name == "transformers"


def test_trainer_model_card_keeps_our_section(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _model()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    trainer.save_model()
    trainer.create_model_card(model_name="tiny-llava-charts")  # replaces README.md with a training summary
    card = ModelCard.load(tmp_path / "README.md")
    assert "tiny-llava-charts" in card.text  # the Trainer's summary ...
    assert card.text.count("## Adapted components") == 1  # ... and our section
    assert card.data.library_name == "peft" and "vision-lora" in card.data.tags


def test_trainer_push_to_hub_uploads_our_card(hub, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _model()
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, push_to_hub=True, hub_model_id=REPO_ID
    )
    expected = _logits(model)
    Trainer(model=model, args=args).push_to_hub(commit_message="End of training")
    files = hub[-1]["files"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and "vision-lora" in card.data.tags
    assert card.text.count("## Adapted components") == 1

    # What the Trainer uploaded loads back into the same adapter: same config, same outputs.
    reloaded = PeftModel.from_pretrained(fresh_model(MODEL_TYPE), _write(files, tmp_path / "downloaded")).eval()
    assert isinstance(reloaded.peft_config["default"], VisionLoraConfig)
    assert reloaded.peft_config["default"].component_r == {"vision": 2}
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-6)


def test_push_to_hub_uploads_every_adapter_with_its_own_card(hub, tmp_path):
    model = _model()
    model.add_adapter("language_only", VisionLoraConfig(r=2, finetune_vision_layers=False, init_lora_weights=False))
    model.push_to_hub(REPO_ID)
    files = hub[-1]["files"]
    assert sorted(files) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "language_only/README.md",
        "language_only/adapter_config.json",
        "language_only/adapter_model.safetensors",
        "language_only/vision_lora_config.json",
        "vision_lora_config.json",
    ]
    card = ModelCard(files["language_only/README.md"].decode())
    assert 'subfolder="language_only"' in card.text and "vision-lora-strategy:language" in card.data.tags

    folder = _write(files, tmp_path / "downloaded")
    model.set_adapter("language_only")
    expected = _logits(model)
    reloaded = PeftModel.from_pretrained(fresh_model(MODEL_TYPE), folder / "language_only").eval()
    assert reloaded.peft_config["default"].component_targets.keys() == {"language"}  # the full config came back
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-6)
    # and through PEFT's subfolder argument
    reloaded = PeftModel.from_pretrained(fresh_model(MODEL_TYPE), folder, subfolder="language_only").eval()
    assert isinstance(reloaded.peft_config["default"], VisionLoraConfig)
