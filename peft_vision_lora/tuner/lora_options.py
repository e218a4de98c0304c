"""Every ``LoraConfig`` field, and what ``VisionLoraConfig`` does with it: same as LoRA, compiled, or refused.

No option may be accepted and then ignored. ``tests/test_lora_options.py`` enumerates the fields of ``LoraConfig``
against :data:`LORA_OPTIONS` (so a field added by a new PEFT release fails the test until it is classified), checks
that each ``same`` field gives the same layers and numbers as ``LoraConfig``, and that each ``refused`` field raises
before the model is touched. ``docs/design-notes.md`` holds :func:`option_table`'s output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Status = Literal["same", "compiled", "refused"]

# field -> (status, note). "same": passed to PEFT's LoRA unchanged; "compiled": VISION_LORA turns it into the
# target regex / patterns it writes back; "refused": any non-default value raises when the config is built.
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
        "True, False, 'gaussian' as in LoRA; 'pissa'/'olora'/'eva'/'corda'/'loftq'/'lora_ga' refused for now "
        "(PEFT's save-time conversion is keyed to PeftType.LORA).",
    ),
    "layers_to_transform": ("compiled", "Layer indices of every numbered stack; see `layer_selection`."),
    "layers_pattern": ("compiled", "Names the stacks `layers_to_transform` counts in."),
    "rank_pattern": ("same", "User patterns kept; per-component patterns added beside them."),
    "alpha_pattern": ("same", "User patterns kept; per-component patterns added beside them."),
    "megatron_config": ("refused", "Megatron parallel linears are not resolved into VLM components."),
    "megatron_core": ("refused", "Only read with megatron_config."),
    "trainable_token_indices": ("same", "Trains the given token embeddings, as in LoRA."),
    "loftq_config": ("refused", "Only read with init_lora_weights='loftq' (refused; needs CUDA in PEFT)."),
    "eva_config": ("refused", "Only read with init_lora_weights='eva' (refused for now)."),
    "corda_config": ("refused", "Only read with init_lora_weights='corda' (refused for now)."),
    "lora_ga_config": ("refused", "Only read with init_lora_weights='lora_ga' (refused for now)."),
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


def refused_options(config: Any) -> list[str]:
    """Refused ``LoraConfig`` fields (and fields this table does not know yet) that ``config`` sets to a
    non-default value."""
    from peft import LoraConfig

    return [
        field.name
        for field in dataclasses.fields(LoraConfig)
        if LORA_OPTIONS.get(field.name, ("refused", ""))[0] == "refused"
        and getattr(config, field.name, None) != _default(field)
    ]


def option_table() -> str:
    """The markdown table for docs/design-notes.md, one row per ``LoraConfig`` field in declaration order."""
    from peft import LoraConfig

    rows = ["| `LoraConfig` field | through `VisionLoraConfig` | note |", "|---|---|---|"]
    for field in dataclasses.fields(LoraConfig):
        status, note = LORA_OPTIONS.get(field.name, ("unclassified", "New in this PEFT release: classify it."))
        rows.append(f"| `{field.name}` | {status} | {note} |")
    return "\n".join(rows)
