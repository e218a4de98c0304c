"""Every ``LoraConfig`` field, and what ``VisionLoraConfig`` does with it: same as LoRA, compiled, or refused.

No option may be accepted and then ignored. ``tests/test_lora_options.py`` enumerates the fields of ``LoraConfig``
against :data:`LORA_OPTIONS` (so a field added by a new PEFT release fails the test until it is classified), checks
that each ``same`` field gives the same layers and numbers as ``LoraConfig``, and that each ``refused`` field raises
before the model is touched. ``docs/design-notes.md`` holds :func:`option_table`'s output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Status = Literal["same", "compiled", "refused", "needs-cuda"]

# field -> (status, note). "same": passed to PEFT's LoRA unchanged; "compiled": VISION_LORA turns it into the
# target regex / patterns it writes back; "refused": any non-default value raises when the config is built;
# "needs-cuda": "same" where CUDA is available, "refused" elsewhere (PEFT's LoftQ quantizes on CUDA only).
LORA_OPTIONS: dict[str, tuple[Status, str]] = {
    "task_type": ("same", "PEFT picks the PeftModel class from it."),
    "peft_type": ("compiled", "Always `VISION_LORA` (set by the config)."),
    "auto_mapping": ("same", "Bookkeeping set by PEFT on save."),
    "peft_version": ("same", "Bookkeeping set by PEFT."),
    "base_model_name_or_path": ("same", "Bookkeeping set by PEFT on save."),
    "revision": ("same", "Bookkeeping, passed through."),
    "inference_mode": ("same", "Frozen adapter, as in LoRA."),
    "r": ("same", "Default rank; `component_r` overrides it per component."),
    "target_modules": ("compiled", "'all-linear' or leaf names, narrowed by the component flags into one regex."),
    "exclude_modules": ("compiled", "Applied while compiling (PEFT's regex or name/suffix semantics)."),
    "lora_alpha": ("same", "Default alpha; `component_alpha` overrides it per component."),
    "lora_dropout": ("same", "Same dropout; the fused path draws its own mask (same rate, not the same bits)."),
    "fan_in_fan_out": ("same", "Only for Conv1D bases, as in LoRA."),
    "bias": ("same", "'none', 'all' or 'lora_only', as in LoRA."),
    "use_rslora": ("same", "Scaling alpha/sqrt(r), as in LoRA."),
    "modules_to_save": ("same", "Merged with the projector under finetune_projector='full'."),
    "init_lora_weights": (
        "same",
        "Every LoRA init: True, False, 'gaussian', 'orthogonal', 'mica', 'pissa'/'pissa_niter_N', 'olora', 'eva' "
        "(`initialize_lora_eva_weights`), 'corda'/'lora_ga' (their PEFT preprocessing, after "
        "`peft_vision_lora.resolve_targets`), with PEFT's save-time conversion; 'loftq' needs CUDA (refused without).",
    ),
    "layers_to_transform": ("compiled", "Layer indices of every numbered stack; see `layer_selection`."),
    "layers_pattern": ("compiled", "Names the stacks `layers_to_transform` counts in."),
    "rank_pattern": ("same", "User patterns kept; per-component patterns added beside them."),
    "alpha_pattern": ("same", "User patterns kept; per-component patterns added beside them."),
    "megatron_config": ("refused", "Megatron parallel linears are not resolved into VLM components."),
    "megatron_core": ("refused", "Only read with megatron_config."),
    "trainable_token_indices": ("same", "Trains the given token embeddings, as in LoRA."),
    "loftq_config": (
        "needs-cuda",
        "Read with init_lora_weights='loftq', as in LoRA; refused without CUDA (PEFT's LoftQ quantizes on CUDA only).",
    ),
    "eva_config": ("same", "Read by `initialize_lora_eva_weights`, as in LoRA."),
    "corda_config": ("same", "Read by `preprocess_corda` and the CorDA init, as in LoRA."),
    "lora_ga_config": ("same", "Read by `preprocess_loraga` and the LoRA-GA init, as in LoRA."),
    "use_dora": ("same", "DoRA layers, as in LoRA (PEFT's forward, not the fused one)."),
    "velora_config": ("refused", "Not checked against VLM targets yet."),
    "alora_invocation_tokens": ("refused", "Activated LoRA needs token-level routing not checked for VLMs."),
    "use_qalora": ("refused", "Needs GPTQ bases, not resolved here."),
    "qalora_group_size": ("refused", "Only read with use_qalora."),
    "monteclora_config": ("refused", "Not checked against VLM targets yet."),
    "layer_replication": ("refused", "Replicates decoder layers of a causal LM; not defined for a VLM's stacks."),
    "runtime_config": ("same", "Runtime-only options (ephemeral GPU offload), not saved."),
    "lora_bias": ("same", "A trainable bias on lora_B, as in LoRA."),
    "target_parameters": ("refused", "Parameter targets (MoE experts) bypass the component flags."),
    "use_bdlora": ("refused", "Not checked against VLM targets yet."),
    "arrow_config": ("refused", "Arrow routing over adapters is not checked for VLMs."),
    "kasa_config": ("refused", "Not checked against VLM targets yet."),
    "ensure_weight_tying": ("same", "Keeps tied embeddings tied, as in LoRA."),
}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def cuda_available() -> bool:
    """Where PEFT's LoftQ can run: it quantizes on ``cuda`` (or ``xpu``) whatever device the weights are on."""
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def status_here(name: str) -> Status:
    """The field's status on this machine (``needs-cuda`` resolves to same or refused); unknown fields: refused."""
    status = LORA_OPTIONS.get(name, ("refused", ""))[0]
    if status == "needs-cuda":
        return "same" if cuda_available() else "refused"
    return status


def refused_options(config: Any) -> list[str]:
    """Refused ``LoraConfig`` fields (and fields this table does not know yet) that ``config`` sets to a
    non-default value."""
    from peft import LoraConfig

    return [
        field.name
        for field in dataclasses.fields(LoraConfig)
        if status_here(field.name) == "refused" and getattr(config, field.name, None) != _default(field)
    ]


def option_table() -> str:
    """The markdown table for docs/design-notes.md, one row per ``LoraConfig`` field in declaration order."""
    from peft import LoraConfig

    rows = ["| `LoraConfig` field | through `VisionLoraConfig` | note |", "|---|---|---|"]
    for field in dataclasses.fields(LoraConfig):
        status, note = LORA_OPTIONS.get(field.name, ("unclassified", "New in this PEFT release: classify it."))
        rows.append(f"| `{field.name}` | {status} | {note} |")
    return "\n".join(rows)
