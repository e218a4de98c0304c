"""Checks that need no hand-written truth, for image-text-to-text model types nobody has read yet.

Hand-written truth (``tests/zoo_wide_truth.py``) pins each known model type's components exactly. A type that a
newer transformers adds has none, yet it must not go unchecked: :func:`structural_invariant_failures` builds its tiny
model on the meta device and checks what holds for every VLM, whatever its layout:

- vision+language selects exactly what vision-only and language-only select together, and those two are disjoint;
- a tower's attention-only and MLP-only selections are disjoint parts of its full selection;
- vision targets lie in a vision subtree, language targets in a language subtree (found here from sub-configs and
  module names, not with the resolver's rules, so a resolver that mislabels a tower fails);
- no selection reaches an output head (``lm_head``), an embedding (token, position, patch) or an MoE router;
- each flag on its own either selects something or raises a ``VisionLoraConfigError`` / ``ComponentResolutionError``
  before the model is touched: ``get_peft_model`` leaves no LoRA layer behind.

:func:`zoo_type_status` says whether a type builds tiny (and why not) and which components the resolver finds: what a
drift report prints for a type before anyone writes its truth.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_MAPPING_NAMES

from ..errors import ComponentResolutionError, VisionLoraConfigError
from ..resolve.components import resolve_components
from ..resolve.names import COMPONENTS
from ..resolve.targets import compile_targets
from ..tuner.config import VisionLoraConfig
from ..zoo.catalog import ZooBuildError, build_zoo_model

__all__ = ["FLAG_SELECTIONS", "ZooTypeStatus", "structural_invariant_failures", "zoo_type_status"]

_OFF = {
    "finetune_vision_layers": False,
    "finetune_language_layers": False,
    "finetune_projector": False,
    "finetune_cross_attention": False,
    "finetune_qformer": False,
    "finetune_audio_layers": False,
}
_VISION = {**_OFF, "finetune_vision_layers": True}
_LANGUAGE = {**_OFF, "finetune_language_layers": True}
# Each flag on its own, and the attention/MLP split of each tower: each must select something or refuse.
FLAG_SELECTIONS: dict[str, dict[str, bool]] = {
    "vision": _VISION,
    "language": _LANGUAGE,
    "projector": {**_OFF, "finetune_projector": True},
    "cross_attention": {**_OFF, "finetune_cross_attention": True},
    "qformer": {**_OFF, "finetune_qformer": True},
    "audio": {**_OFF, "finetune_audio_layers": True},
    "vision attention": {**_VISION, "finetune_mlp_modules": False},
    "vision mlp": {**_VISION, "finetune_attention_modules": False},
    "language attention": {**_LANGUAGE, "finetune_mlp_modules": False},
    "language mlp": {**_LANGUAGE, "finetune_attention_modules": False},
}
# vision-only, language-only, both (cross-attention follows the language flag, as by default).
_STRATEGIES = (
    {"finetune_vision_layers": True, "finetune_language_layers": False},
    {"finetune_vision_layers": False, "finetune_language_layers": True},
    {"finetune_vision_layers": True, "finetune_language_layers": True},
)
_EVERYTHING = {
    "finetune_vision_layers": True,
    "finetune_projector": True,
    "finetune_cross_attention": True,
    "finetune_qformer": True,
    "finetune_audio_layers": True,
}
_REFUSALS = (VisionLoraConfigError, ComponentResolutionError)

# Sub-config keys (``vision_config``, ``text_config``, ...) and module names that say which tower a module is. Evolla's
# protein encoder plays the vision tower's part (a non-text encoder feeding the language model).
_VISION_WORDS = re.compile(r"vision|visual|image|video|protein")
_VISION_NAMES = re.compile(r"vision|visual|image|video")
_LANGUAGE_WORDS = re.compile(r"text|language|llm|decoder")
_LANGUAGE_NAMES = ("language_model", "text_model", "llm", "text_decoder", "decoder")
# Path elements of embeddings (token, position, patch): ``embed_tokens``, ``patch_embed``, ``embeddings``,
# ``position_embedding``, Fuyu's ``vision_embed_tokens``, Gemma 4 unified's ``patch_dense``. Modality embedders that
# map features into the text space (``embed_vision``) are projectors, not embeddings, and do not match.
_EMBEDDING_PART = re.compile(
    r"^(\w+_)?embed(s|der|dings?)?$|^(\w+_)?embed_(tokens|positions)$|^patch_dense$|^wte$|^wpe$"
)
_MODALITY_EMBEDDER = re.compile(r"^embed_(vision|audio|image|video)$")
_HEAD_LEAF = re.compile(r"^(lm_head|output_projection)$")


@dataclass(frozen=True)
class ZooTypeStatus:
    """What a drift report needs about one model type: does it build tiny, and what the resolver finds on it."""

    model_type: str
    builds: bool
    error: str | None = None  # the ZooBuildError message when it does not build
    parameters: int | None = None  # of the tiny model
    components: dict[str, tuple[str, ...]] = field(default_factory=dict)  # component -> module paths (non-empty)
    excluded: tuple[str, ...] = ()  # module paths that belong to no component (VQ tokenizers, action experts)


def zoo_type_status(model_type: str) -> ZooTypeStatus:
    """Build ``model_type`` tiny on the meta device and resolve its components; a build failure is reported, not
    raised (an unknown type still raises ``ValueError``)."""
    try:
        model = build_zoo_model(model_type, device="meta")
    except ZooBuildError as error:
        return ZooTypeStatus(model_type, builds=False, error=str(error))
    components = resolve_components(model)
    found = {c: components[c] for c in COMPONENTS if components[c]}
    parameters = sum(p.numel() for p in model.parameters())
    return ZooTypeStatus(model_type, True, None, parameters, found, components.excluded)


def structural_invariant_failures(model_type: str, model: nn.Module | None = None) -> list[str]:
    """The generic invariants ``model_type`` breaks (empty when all hold), one sentence each.

    ``model`` defaults to the tiny meta-device build of :func:`~peft_vision_lora.zoo.build_zoo_model` (which raises
    ``ZooBuildError`` for a type that cannot be built); no weights are allocated. Pass a model to reuse one.
    """
    model = model if model is not None else build_zoo_model(model_type, device="meta")
    select = _selector(model)
    vision, language, both = (select(**flags) for flags in _STRATEGIES)
    failures = _union_failures(vision, language, both)
    failures += _subtree_failures(model, vision or set(), language or set())
    selections = {flag: select(**flags) for flag, flags in FLAG_SELECTIONS.items()}
    failures += _split_failures(selections)
    for flag, selected in selections.items():
        if not selected:
            failures += _refusal_failures(model, flag, FLAG_SELECTIONS[flag])
    chosen = set().union(*(s for s in (vision, language, both, select(**_EVERYTHING), *selections.values()) if s))
    return failures + _forbidden_failures(model, chosen)


def _selector(model: nn.Module) -> Callable[..., set[str] | None]:
    """``select(**flags)``: module names ``compile_targets`` picks, or None when it refuses with a config error."""

    def select(**flags: bool) -> set[str] | None:
        try:
            return {t.name for t in compile_targets(model, VisionLoraConfig(r=4, **flags)).targets}
        except _REFUSALS:
            return None

    return select


def _union_failures(vision: set[str] | None, language: set[str] | None, both: set[str] | None) -> list[str]:
    """vision+language selects vision-only | language-only; it may refuse only when one of them refuses (no vision
    tower makes both-towers a config error too)."""
    if both is None:
        if vision is None or language is None:
            return []
        return ["vision+language refuses, but vision-only and language-only both select"]
    vision, language = vision or set(), language or set()
    failures = []
    if both != vision | language:
        extra, missing = sorted(both - vision - language), sorted((vision | language) - both)
        failures.append(
            f"vision+language is not vision-only | language-only: it adds {_few(extra)} and drops {_few(missing)}"
        )
    if vision & language:
        failures.append(f"vision-only and language-only both select {_few(sorted(vision & language))}")
    return failures


def _split_failures(selections: dict[str, set[str] | None]) -> list[str]:
    failures = []
    for tower in ("vision", "language"):
        full = selections[tower] or set()
        attention, mlp = selections[f"{tower} attention"] or set(), selections[f"{tower} mlp"] or set()
        if attention & mlp:
            failures.append(f"{tower}: attention-only and MLP-only both select {_few(sorted(attention & mlp))}")
        if (attention | mlp) - full:
            failures.append(
                f"{tower}: the attention/MLP split selects {_few(sorted((attention | mlp) - full))} "
                f"that {tower}-only does not"
            )
    return failures


def _subtree_failures(model: nn.Module, vision: set[str], language: set[str]) -> list[str]:
    """Each target's nearest enclosing tower (by the longest root) must be of the flag's kind."""
    towers = _tower_roots(model)
    failures = []
    for kind, selected in (("vision", vision), ("language", language)):
        outside = sorted(name for name in selected if kind not in _nearest_towers(name, towers))
        if outside:
            failures.append(f"{kind}-only selects modules outside every {kind} subtree: {_few(outside)}")
    return failures


def _refusal_failures(model: nn.Module, flag: str, flags: dict[str, bool]) -> list[str]:
    """A flag that selects nothing must raise a config error, and ``get_peft_model`` must then leave the model as it
    was: no LoRA layer, the same modules, the same ``requires_grad``."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = VisionLoraConfig(r=4, **flags)
    try:
        compile_targets(model, config)
    except _REFUSALS:
        pass
    else:
        return [f"{flag}: compile_targets selected nothing and raised nothing"]
    before = _snapshot(model)
    try:
        get_peft_model(model, config)
    except _REFUSALS:
        pass
    except Exception as error:  # noqa: BLE001 - any other failure is the finding
        return [f"{flag}: get_peft_model raised {type(error).__name__} instead of a config error: {error}"]
    else:
        return [f"{flag}: compile_targets refused but get_peft_model went ahead"]
    injected = sorted(name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer))
    if injected or _snapshot(model) != before:
        return [f"{flag}: the refused get_peft_model changed the model ({_few(injected)} adapted)"]
    return []


def _snapshot(model: nn.Module) -> tuple[list[str], list[tuple[str, bool]], bool]:
    modules = [name for name, _ in model.named_modules()]
    grads = [(name, p.requires_grad) for name, p in model.named_parameters()]
    return modules, grads, hasattr(model, "peft_config")


def _forbidden_failures(model: nn.Module, chosen: set[str]) -> list[str]:
    modules = dict(model.named_modules())
    heads = _output_heads(model)
    checks = {
        "an output head": lambda n: id(modules[n]) in heads or bool(_HEAD_LEAF.match(n.rsplit(".", 1)[-1])),
        "an embedding": _is_embedding,
        "an MoE router": lambda n: _is_router(modules, n),
    }
    failures = []
    for what, check in checks.items():
        hits = sorted(n for n in chosen if check(n))
        if hits:
            failures.append(f"a selection reaches {what}: {_few(hits)}")
    return failures


def _tower_roots(model: nn.Module) -> dict[str, set[str]]:
    """Module path -> tower kinds ("vision", "language"), read from the model alone (not with the resolver's rules).

    Vision: modules built from a sub-config whose key names a non-text modality (``vision_config``) or whose model type
    is an image backbone of transformers (VisionEncoderDecoder's ViT ``encoder``), and modules named for vision
    (``vision_tower``, ``visual``, ``image_tower``). Language: modules built from a text sub-config (``text_config``,
    ``decoder``) or named as language models (``language_model``, ``text_model``, ``decoder``); when no text sub-config
    exists, the top config is the text config and the whole model (``""``) is the language tower, minus the vision
    towers inside it.
    """
    config = getattr(model, "config", None)
    keys = _subconfig_keys(config) if isinstance(config, PretrainedConfig) else {}
    roots: dict[str, set[str]] = {}
    text_subconfig = False
    for name, module in model.named_modules():
        if not name:
            continue
        sub = getattr(module, "config", None)
        key = keys.get(id(sub), "") if sub is not None and sub is not config else ""
        leaf = name.rsplit(".", 1)[-1]
        image_backbone = bool(key) and getattr(sub, "model_type", None) in MODEL_FOR_IMAGE_MAPPING_NAMES
        if _VISION_WORDS.search(key) or image_backbone or _is_vision_name(leaf):
            roots.setdefault(name, set()).add("vision")
        text_key = bool(_LANGUAGE_WORDS.search(key)) and not _VISION_WORDS.search(key)
        text_subconfig |= text_key
        if text_key or leaf in _LANGUAGE_NAMES:
            roots.setdefault(name, set()).add("language")
    if not text_subconfig:
        roots.setdefault("", set()).add("language")
    return roots


def _is_vision_name(leaf: str) -> bool:
    """``vision_tower``, ``visual``, ``image_tower``; not modality embedders (``embed_vision``) or projections
    (``vision_projection``, ``image_to_text_projection``), which map vision features to text."""
    return bool(_VISION_NAMES.search(leaf)) and not leaf.startswith("embed_") and "proj" not in leaf


def _subconfig_keys(config: PretrainedConfig, prefix: str = "") -> dict[int, str]:
    """id(sub-config) -> its key path (``vlm_config.vision_config``), searching nested sub-configs."""
    found: dict[int, str] = {}
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig) and id(value) not in found:
            found[id(value)] = prefix + key
            found.update({k: v for k, v in _subconfig_keys(value, f"{prefix}{key}.").items() if k not in found})
    return found


def _nearest_towers(name: str, towers: dict[str, set[str]]) -> set[str]:
    """Kinds of the deepest tower root enclosing ``name`` (a vision tower inside a text-config model is vision)."""
    enclosing = [root for root in towers if root == "" or name == root or name.startswith(root + ".")]
    if not enclosing:
        return set()
    depth = max(len(root) for root in enclosing)
    return set().union(*(towers[root] for root in enclosing if len(root) == depth))


def _output_heads(model: nn.Module) -> set[int]:
    """ids of the output embeddings of the model and of every transformers model nested in it."""
    heads = set()
    for module in [model, *(m for m in model.modules() if isinstance(m, PreTrainedModel))]:
        try:
            head = module.get_output_embeddings()
        except Exception:  # noqa: BLE001 - some models raise here; then the name check still applies
            head = None
        if isinstance(head, nn.Module):
            heads.add(id(head))
    return heads


def _is_embedding(name: str) -> bool:
    """Token, position and patch embeddings; not what a modality embedder (Gemma's ``embed_vision``) holds."""
    parts = name.split(".")
    return not any(_MODALITY_EMBEDDER.match(p) for p in parts) and any(_EMBEDDING_PART.match(p) for p in parts)


def _is_router(modules: dict[str, nn.Module], name: str) -> bool:
    """A routing linear: named ``router`` (or a ``*Router`` class), or a ``gate``/``*_gate`` beside ``experts``."""
    if "router" in name or type(modules[name]).__name__.endswith("Router"):
        return True
    parts = name.split(".")
    for depth in range(len(parts), 0, -1):
        part, block = parts[depth - 1], ".".join(parts[: depth - 1])
        if (part == "gate" or part.endswith("_gate")) and f"{block}.experts" in modules:
            return True
    return False


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})" if names else "nothing"
