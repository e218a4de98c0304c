"""``VisionLoraConfig``: LoRA driven by VLM component flags instead of module names.

It subclasses PEFT's ``LoraConfig`` so every LoRA option (dropout, init, rslora, bias, ...) keeps working, and only
changes ``peft_type`` so that PEFT routes it to :class:`~peft_vision_lora.model.VisionLoraModel`. The flags are
compiled against the real model when the adapter is injected; the result (an anchored regex plus non-overlapping
``rank_pattern``/``alpha_pattern``) is written back into this config so that the saved adapter is plain PEFT LoRA
underneath and a reload does not depend on re-resolving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peft import LoraConfig
from peft.utils import CONFIG_NAME

from ..errors import VisionLoraConfigError
from ..kernels.dispatch import check_kernel_name
from ..resolve.names import BLOCK_COMPONENTS, COMPONENT_FLAGS, COMPONENTS, check_known_components
from .lora_options import LORA_OPTIONS, cuda_available, refused_options
from .peft_type import ensure_peft_type

# Where a portable adapter folder keeps the full VisionLoraConfig, beside a plain-LoRA adapter_config.json.
SIDECAR_NAME = "vision_lora_config.json"

# The design's strategy table. Presets set the component flags; explicit flags win.
TASK_PRESETS: dict[str, dict[str, bool]] = {
    "ocr": {"finetune_vision_layers": True, "finetune_language_layers": True},
    "captioning": {"finetune_vision_layers": True, "finetune_language_layers": True},
    "vqa": {"finetune_vision_layers": False, "finetune_language_layers": True},
    "domain_adaptation": {"finetune_vision_layers": True, "finetune_language_layers": False},
}
TASK_ALIASES = {"document": "ocr", "caption": "captioning", "domain": "domain_adaptation"}
# Initialisations PEFT runs only on CUDA (LoftQ quantizes there whatever the weights' device): refused without it.
CUDA_ONLY_INITS = ("loftq",)

_FLAG_FIELDS = (
    "finetune_vision_layers",
    "finetune_language_layers",
    "finetune_attention_modules",
    "finetune_mlp_modules",
)


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
        # PEFT refuses layer filters next to a str target and would ignore them on a regex; we compile them into the
        # regex ourselves (see peft_vision_lora.layer_selection), so PEFT's checks must not see them.
        layers, pattern = self.layers_to_transform, self.layers_pattern
        self.layers_to_transform = self.layers_pattern = None
        self._check_init_runs_here()
        # before PEFT's own __post_init__, which converts or drops some of them (loftq_config without 'loftq')
        refused = refused_options(self)
        if refused:
            notes = "; ".join(
                f"`{name}`: {LORA_OPTIONS.get(name, ('', 'new in this PEFT release'))[1]}" for name in refused
            )
            raise VisionLoraConfigError(
                f"VISION_LORA does not support {refused} yet ({notes}). Leave them at their defaults, or use PEFT's "
                "LoraConfig with explicit target_modules (see docs/design-notes.md, 'LoraConfig options')."
            )
        super().__post_init__()
        self.layers_to_transform, self.layers_pattern = layers, pattern
        self.peft_type = ensure_peft_type()
        self._apply_task_preset()
        self._validate()

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs):
        """PEFT's reader, pointed at the sidecar (``SIDECAR_NAME``) when it sits beside ``adapter_config.json``.

        A portable folder (see :mod:`peft_vision_lora.sharing.portable`) keeps plain LoRA in ``adapter_config.json``
        for PEFT alone and the full config in the sidecar; this is where the full config comes back.
        """
        path = Path(path_json_file)
        sidecar = path.with_name(SIDECAR_NAME)
        chosen = sidecar if path.name == CONFIG_NAME and sidecar.is_file() else path_json_file
        return super().from_json_file(chosen, **kwargs)

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
        try:
            check_kernel_name(self.kernel)
        except ValueError as error:
            raise VisionLoraConfigError(str(error)) from None
        for name, mapping, what in (
            ("component_r", self.component_r, "Ranks"),
            ("component_alpha", self.component_alpha, "Alphas"),
        ):
            check_known_components(name, mapping)
            bad = {k: v for k, v in mapping.items() if not _positive_number(v, integer=name == "component_r")}
            if bad:
                kind = "positive integers" if name == "component_r" else "positive numbers"
                raise VisionLoraConfigError(f"{what} in `{name}` must be {kind}, got {bad}.")
        self._validate_component_layers()
        self._validate_layers_to_transform()
        if not self.is_resolved:
            self._check_flags_select_something()

    def _check_init_runs_here(self) -> None:
        """LoftQ: PEFT quantizes on CUDA; refuse it up front where there is none (before loftq_config is looked at)."""
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() in CUDA_ONLY_INITS and not cuda_available():
            raise VisionLoraConfigError(
                f"init_lora_weights={init!r} needs a CUDA device: PEFT's LoftQ quantizes the base weights on CUDA "
                "and none is available here. Run on a GPU machine, or pick an init that runs on CPU: 'pissa' (or "
                "'pissa_niter_4'), 'olora', 'eva', 'corda', True."
            )

    def _validate_component_layers(self) -> None:
        """Layer lists are JSON-serialisable lists of ints (a range or tuple is converted) for known components."""
        if not isinstance(self.component_layers, dict):
            raise VisionLoraConfigError(
                f"`component_layers` must be a dict like {{'vision': [-2, -1]}}, got {self.component_layers!r}."
            )
        check_known_components("component_layers", self.component_layers)
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

    def _validate_layers_to_transform(self) -> None:
        """PEFT's ``layers_to_transform``/``layers_pattern``, normalised to a sorted list of ints / list of names."""
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if pattern is not None and layers is None:
            raise VisionLoraConfigError(
                f"`layers_pattern={pattern!r}` needs `layers_to_transform` (which layers of those stacks to adapt); "
                "or use `component_layers={'language': [...]}` to pick layers per component."
            )
        if layers is None:
            return
        values = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if (
            not isinstance(values, (list, tuple, range))
            or not values
            or any(not isinstance(v, int) or isinstance(v, bool) for v in values)
        ):
            raise VisionLoraConfigError(
                f"`layers_to_transform` must be an int or a non-empty list of ints (layer indices of every numbered "
                f"stack; negative ones count from the end), got {layers!r}. Use `component_layers` for per-component "
                "layers."
            )
        self.layers_to_transform = sorted(set(values))
        if pattern is not None:
            names = [pattern] if isinstance(pattern, str) else pattern
            if (
                not isinstance(names, (list, tuple))
                or not names
                or any(not isinstance(n, str) or not n for n in names)
            ):
                raise VisionLoraConfigError(
                    f"`layers_pattern` must be a module-list name such as 'layers' or 'blocks' (or a list of them), "
                    f"got {pattern!r}."
                )
            self.layers_pattern = list(names) if len(names) > 1 else names[0]

    def _check_flags_select_something(self) -> None:
        components = self.selected_components()
        if not components:
            raise VisionLoraConfigError(
                "no linear layer matched: vision=False, language=False, projector=False, cross_attention=False, "
                "qformer=False, audio=False. Enable at least one component flag (e.g. finetune_language_layers=True) "
                "or pick a task preset."
            )
        no_kind = not self.finetune_attention_modules and not self.finetune_mlp_modules
        if components <= set(BLOCK_COMPONENTS) and no_kind:
            raise VisionLoraConfigError(
                "no linear layer matched: finetune_attention_modules=False and finetune_mlp_modules=False select "
                "nothing inside the chosen components. Enable one of them, or set finetune_projector."
            )

    def selected_components(self) -> set[str]:
        """Components whose linears the flags ask for (before looking at any model)."""
        return {component for component, flag in COMPONENT_FLAGS.items() if getattr(self, flag)}

    def rank_for(self, component: str) -> int:
        return self.component_r.get(component, self.r)

    def alpha_for(self, component: str) -> int:
        return self.component_alpha.get(component, self.lora_alpha)


def _positive_number(value: object, *, integer: bool) -> bool:
    """A positive int (ranks), or a positive int or float (alphas); never a bool."""
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and value > 0
