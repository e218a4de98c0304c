"""``VisionLoraConfig``: LoRA driven by VLM component flags instead of module names.

It subclasses PEFT's ``LoraConfig`` so every LoRA option (dropout, init, rslora, bias, ...) keeps working, and only
changes ``peft_type`` so that PEFT routes it to :class:`~peft_vision_lora.model.VisionLoraModel`. The flags are
compiled against the real model when the adapter is injected; the result (an anchored regex plus non-overlapping
``rank_pattern``/``alpha_pattern``) is written back into this config so that the saved adapter is plain PEFT LoRA
underneath and a reload does not depend on re-resolving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

from .registration import ensure_peft_type

COMPONENTS = ("vision", "projector", "language", "cross_attention", "qformer", "audio")

# The design's strategy table. Presets set the component flags; explicit flags win.
TASK_PRESETS: dict[str, dict[str, bool]] = {
    "ocr": {"finetune_vision_layers": True, "finetune_language_layers": True},
    "captioning": {"finetune_vision_layers": True, "finetune_language_layers": True},
    "vqa": {"finetune_vision_layers": False, "finetune_language_layers": True},
    "domain_adaptation": {"finetune_vision_layers": True, "finetune_language_layers": False},
}
TASK_ALIASES = {"document": "ocr", "caption": "captioning", "domain": "domain_adaptation"}
KERNELS = ("auto", "triton", "torch")
# Initialisations that PEFT converts on save only for ``PeftType.LORA`` (PiSSA/OLoRA/CorDA/LoRA-GA conversion) or that
# need PEFT's LoRA-only entry points (EVA, LoftQ): rejected instead of silently saving unconverted weights.
UNSUPPORTED_INITS = ("pissa", "olora", "corda", "lora_ga", "eva", "loftq")

_FLAG_FIELDS = (
    "finetune_vision_layers",
    "finetune_language_layers",
    "finetune_attention_modules",
    "finetune_mlp_modules",
)


class VisionLoraConfigError(ValueError):
    """A VisionLoraConfig that cannot be honoured; still a ``ValueError`` for callers that catch that."""


def _check_known_components(field_name: str, mapping: dict) -> None:
    unknown = sorted(set(mapping) - set(COMPONENTS))
    if unknown:
        raise VisionLoraConfigError(f"Unknown component(s) {unknown} in `{field_name}`; components are {COMPONENTS}.")


@dataclass
class VisionLoraConfig(LoraConfig):
    """LoRA for vision-language models, configured by component.

    Every option of ``peft.LoraConfig`` (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``use_dora``,
    ``init_lora_weights``, ``modules_to_save``, ...) keeps its meaning; the fields below choose *where* LoRA goes.
    The flags are compiled against the real model when the adapter is injected (``get_peft_model``), and the
    result is written back into ``target_modules``, ``rank_pattern`` and ``alpha_pattern``.

    Example:

    ```python
    VisionLoraConfig(r=16, finetune_vision_layers=True, finetune_language_layers=True)
    VisionLoraConfig(task="vqa", component_r={"language": 32})
    ```

    Args:
        target_modules: Candidate linears: ``"all-linear"`` (default) or a list of leaf names such as
            ``["q_proj", "fc1"]``; the component and module-kind flags keep the candidates in the chosen parts of
            the model. After injection it holds the compiled regex.
        task: Strategy preset, one of ``"ocr"``, ``"captioning"``, ``"vqa"``, ``"domain_adaptation"`` (aliases
            ``"document"``, ``"caption"``, ``"domain"``). Sets the component flags; explicit flags win.
        finetune_vision_layers: LoRA on the vision encoder(s). Default True, or the task preset's choice.
        finetune_language_layers: LoRA on the language model. Default True, or the task preset's choice.
        finetune_attention_modules: Keep linears inside attention blocks (decided by the parent block, not by leaf
            names). Default True.
        finetune_mlp_modules: Keep linears inside MLP blocks. Default True.
        finetune_projector: The vision-to-text projector: False (frozen, default), True (LoRA on its linears) or
            ``"full"`` (trained fully through PEFT's ``modules_to_save``).
        finetune_cross_attention: Cross-attention blocks of the language model (Mllama). Default: follows
            ``finetune_language_layers``.
        finetune_qformer: The Q-Former (BLIP-2, InstructBLIP). Default: follows ``finetune_projector``.
        finetune_audio_layers: Audio towers of omni models; never touched by the vision/language flags.
            Default False.
        component_r: Rank per component, e.g. ``{"vision": 8}``; keys are ``COMPONENTS``. Others use ``r``.
        component_alpha: ``lora_alpha`` per component, same keys. Others use ``lora_alpha``.
        component_layers: Layers to adapt per component, e.g. ``{"vision": [-2, -1], "language": range(8)}``:
            indices into each numbered stack (negative ones count from the end). Components not named keep all.
        kernel: LoRA Linear backend: ``"auto"`` (Triton on CUDA when importable, else torch), ``"triton"``
            (refused when the model is wrapped if Triton cannot run in this process) or ``"torch"``.
        requested_target_modules: Set on injection: the user's original ``target_modules``. A config with it set
            is resolved and is not recompiled on load.
        component_targets: Set on injection: for each component, a regex matching exactly its adapted modules.
            The model card, ``inspect ADAPTER_DIR`` and ``export_lora(language_only=True)`` read it.
    """

    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={
            "help": "Candidate linears: 'all-linear' (default) or a list of leaf names such as ['q_proj', 'fc1']. "
            "The component and module-kind flags then keep the candidates in the chosen parts of the model. "
            "After injection this holds the compiled regex; the request is kept in `requested_target_modules`."
        },
    )
    task: str | None = field(
        default=None,
        metadata={"help": f"Strategy preset: one of {sorted(TASK_PRESETS)}. Explicit flags override it."},
    )
    finetune_vision_layers: bool | None = field(
        default=None, metadata={"help": "LoRA on the vision encoder(s). Default True (or the task preset)."}
    )
    finetune_language_layers: bool | None = field(
        default=None, metadata={"help": "LoRA on the language model. Default True (or the task preset)."}
    )
    finetune_attention_modules: bool | None = field(
        default=None, metadata={"help": "Keep linears inside attention blocks. Default True."}
    )
    finetune_mlp_modules: bool | None = field(
        default=None, metadata={"help": "Keep linears inside MLP blocks. Default True."}
    )
    finetune_projector: bool | Literal["full"] = field(
        default=False,
        metadata={
            "help": "The vision-to-text projector: False (frozen), True (LoRA on its linears) or 'full' (train it "
            "fully through PEFT's modules_to_save)."
        },
    )
    finetune_cross_attention: bool | None = field(
        default=None,
        metadata={"help": "Cross-attention blocks of the language model (Mllama). Default: follows language."},
    )
    finetune_qformer: bool | None = field(
        default=None,
        metadata={"help": "Q-Former (BLIP-2, InstructBLIP). Default: follows finetune_projector (LoRA)."},
    )
    finetune_audio_layers: bool = field(
        default=False, metadata={"help": "Audio towers of omni models; never touched by the vision/language flags."}
    )
    component_r: dict[str, int] = field(
        default_factory=dict, metadata={"help": f"Rank per component, e.g. {{'vision': 8}}. Keys: {COMPONENTS}."}
    )
    component_alpha: dict[str, int] = field(
        default_factory=dict, metadata={"help": "lora_alpha per component, same keys as component_r."}
    )
    component_layers: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": "Layers to adapt per component, e.g. {'vision': [-2, -1], 'language': range(0, 8)}: indices into "
            "each numbered stack of that component (negative counts from its end; a range becomes a list). "
            "Components not named keep all their layers; modules outside numbered stacks drop out of a named one."
        },
    )
    kernel: str = field(
        default="auto",
        metadata={
            "help": "LoRA Linear backend: 'auto' (Triton on CUDA when importable, else torch), 'triton', 'torch'."
        },
    )
    requested_target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Set on injection: the user's original target_modules. Marks the config as resolved."},
    )
    component_targets: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Set on injection: for each component, a regex matching exactly its adapted modules. The model "
            "card and `export_lora(language_only=True)` read it from adapter_config.json without the base model."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        self._apply_task_preset()
        self._validate()

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write adapter_config.json, then the model card (see :mod:`peft_vision_lora.card`).

        ``PeftModel.save_pretrained`` saves the weights before the config, so at this point the card can count them;
        a config saved on its own (no weights beside it) gets no card.
        """
        super().save_pretrained(save_directory, **kwargs)
        from .card import write_model_card

        write_model_card(save_directory, self)

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs):
        """PEFT's reader, pointed at ``vision_lora_config.json`` when it sits beside ``adapter_config.json``.

        A portable folder (see :mod:`peft_vision_lora.portable`) keeps plain LoRA in ``adapter_config.json`` for
        PEFT alone and the full config in the sidecar; this is where the full config comes back.
        """
        from .portable import read_sidecar_instead

        return super().from_json_file(read_sidecar_instead(path_json_file), **kwargs)

    @property
    def is_resolved(self) -> bool:
        """True once targets were compiled on a model (then target_modules is the compiled regex)."""
        return self.requested_target_modules is not None

    def _apply_task_preset(self) -> None:
        preset: dict[str, bool] = {}
        if self.task is not None:
            task = TASK_ALIASES.get(self.task, self.task)
            if task not in TASK_PRESETS:
                raise VisionLoraConfigError(
                    f"Unknown task preset {self.task!r}. Supported presets: {sorted(TASK_PRESETS)} "
                    f"(aliases: {sorted(TASK_ALIASES)}); or leave task=None and set the finetune_* flags."
                )
            self.task = task
            preset = TASK_PRESETS[task]
        for name in _FLAG_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, preset.get(name, True))
        if self.finetune_cross_attention is None:
            self.finetune_cross_attention = self.finetune_language_layers
        if self.finetune_qformer is None:
            self.finetune_qformer = bool(self.finetune_projector)

    def _validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise VisionLoraConfigError(f"`r` must be a positive integer, got {self.r!r}.")
        if self.finetune_projector not in (True, False, "full"):
            raise VisionLoraConfigError(
                f"`finetune_projector` must be False, True (LoRA) or 'full', got {self.finetune_projector!r}."
            )
        if self.kernel not in KERNELS:
            raise VisionLoraConfigError(f"Unknown kernel {self.kernel!r}; supported: {KERNELS}.")
        for name, mapping in (("component_r", self.component_r), ("component_alpha", self.component_alpha)):
            _check_known_components(name, mapping)
            bad = {k: v for k, v in mapping.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0}
            if bad and name == "component_r":
                raise VisionLoraConfigError(f"Ranks in `component_r` must be positive integers, got {bad}.")
        self._validate_component_layers()
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(UNSUPPORTED_INITS):
            raise VisionLoraConfigError(
                f"init_lora_weights={init!r} is not supported by VISION_LORA: PEFT applies its save-time conversion "
                "only to PeftType.LORA. Use True, False or 'gaussian', or export to plain LoRA first."
            )
        if not self.is_resolved:
            self._check_flags_select_something()

    def _validate_component_layers(self) -> None:
        """Layer lists are JSON-serialisable lists of ints (a range or tuple is converted) for known components."""
        if not isinstance(self.component_layers, dict):
            raise VisionLoraConfigError(
                f"`component_layers` must be a dict like {{'vision': [-2, -1]}}, got {self.component_layers!r}."
            )
        _check_known_components("component_layers", self.component_layers)
        for component, layers in self.component_layers.items():
            values = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(values, (list, tuple, range)) or not values:
                raise VisionLoraConfigError(
                    f"`component_layers[{component!r}]` must be a non-empty list of layer indices, got {layers!r}."
                )
            if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
                raise VisionLoraConfigError(
                    f"`component_layers[{component!r}]` must hold integers (negative ones count from the end), "
                    f"got {layers!r}."
                )
            self.component_layers[component] = sorted(set(values))

    def _check_flags_select_something(self) -> None:
        components = self.selected_components()
        if not components:
            raise VisionLoraConfigError(
                "no linear layer matched: vision=False, language=False, projector=False, cross_attention=False, "
                "qformer=False, audio=False. Enable at least one component flag (e.g. finetune_language_layers=True) "
                "or pick a task preset."
            )
        tower_parts = {"vision", "language", "cross_attention", "qformer", "audio"}
        if components <= tower_parts and not self.finetune_attention_modules and not self.finetune_mlp_modules:
            raise VisionLoraConfigError(
                "no linear layer matched: finetune_attention_modules=False and finetune_mlp_modules=False select "
                "nothing inside the chosen components. Enable one of them, or set finetune_projector."
            )

    def selected_components(self) -> set[str]:
        """Components whose linears the flags ask for (before looking at any model)."""
        chosen = {
            "vision": self.finetune_vision_layers,
            "language": self.finetune_language_layers,
            "projector": bool(self.finetune_projector),
            "cross_attention": self.finetune_cross_attention,
            "qformer": self.finetune_qformer,
            "audio": self.finetune_audio_layers,
        }
        return {name for name, on in chosen.items() if on}

    def rank_for(self, component: str) -> int:
        return self.component_r.get(component, self.r)

    def alpha_for(self, component: str) -> int:
        return self.component_alpha.get(component, self.lora_alpha)
