"""Upload an adapter with its model card in one Hub commit (what ``model.push_to_hub`` runs for our adapters)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from .atomic_save import writing_into_private_folder
from .card import add_tags, write_model_card

HUB_FILE_SUFFIXES = (".safetensors", ".json", ".md")
DEFAULT_COMMIT_MESSAGE = "Upload adapter (peft-vision-lora)"


def _existing_card(repo_id: str, token: str | bool | None) -> str | None:
    """The repo's README.md, kept as transformers' ``push_to_hub`` keeps it; None for a repo without one."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return ModelCard.load(repo_id, token=token).content
    except EntryNotFoundError:
        return None


def push_adapter_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    selected_adapters: list[str] | None = None,
):
    """Upload the adapter weights (safetensors only), its config and the model card to ``repo_id``, portable.

    The upload is in the portable format (:mod:`.portable`): ``adapter_config.json`` is plain LoRA, which PEFT alone
    and serving stacks load, and ``vision_lora_config.json`` keeps the full ``VisionLoraConfig`` for this package.

    What ``model.push_to_hub`` runs for models with a ``VISION_LORA`` adapter (transformers' own mixin would replace
    README.md with a generic transformers card). The card is the one ``save_pretrained`` writes, with loading
    instructions naming ``repo_id``; a card already on the Hub is updated, keeping text written outside our section.
    Returns ``HfApi.create_commit``'s ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        try:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        except HfHubHTTPError as error:  # as transformers: no right to branch, but a PR may still be opened
            if not (create_pr and error.response is not None and error.response.status_code == 403):
                raise
    existing_card = _existing_card(repo_id, token)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if existing_card is not None:
            (folder / "README.md").write_text(existing_card, encoding="utf-8")
        with writing_into_private_folder():
            # portable: plain LoRA in adapter_config.json (PEFT alone loads it), full config in the sidecar
            model.save_pretrained(
                str(folder), safe_serialization=True, selected_adapters=selected_adapters, portable=True
            )
        for config_file in folder.rglob("adapter_config.json"):
            adapter_dir = config_file.parent
            name = adapter_dir.relative_to(folder).as_posix()
            adapter = model.peft_config["default" if name == "." else name]
            write_model_card(adapter_dir, adapter, repo_id=repo_id, subfolder=None if name == "." else name)
        if tags:
            for readme in folder.rglob("README.md"):
                add_tags(readme, list(tags))
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(HUB_FILE_SUFFIXES))
        operations = [
            CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
