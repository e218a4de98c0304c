"""Find the parts of a loaded VLM: vision tower(s), projector, language model, cross-attention, Q-Former, audio.

Resolution is structural: a transformers VLM keeps its sub-configs on ``model.config`` (``vision_config``,
``text_config``, ``qformer_config``, ``audio_config``, ...) and builds each tower from its sub-config, so the
shallowest submodule whose ``.config`` *is* that sub-config is the tower. Everything trainable outside the towers on
the way from vision to text is the projector, as are merger modules inside the vision tower (Qwen2-VL's
``visual.merger``). A small override table and a name-based fallback cover the models that break the rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
try:  # GPT-2 style linears; PEFT's "all-linear" counts them too.
    from transformers.pytorch_utils import Conv1D

    LINEAR_TYPES = (nn.Linear, Conv1D)
except ImportError:  # pragma: no cover
    pass

# Sub-config attribute name -> component. Checked in order; the first fragment found in the key wins.
_SUBCONFIG_COMPONENTS = (
    ("audio", "audio"),
    ("qformer", "qformer"),
    ("vision", "vision"),
    ("image", "vision"),
    ("visual", "vision"),
    ("text", "language"),
    ("language", "language"),
    ("llm", "language"),
)
# Name-based fallback for models without sub-configs (remote code, hand-rolled VLMs).
_FALLBACK_NAMES = {
    "vision": ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "vision"),
    "language": ("language_model", "text_model", "llm", "text_decoder", "decoder"),
    "audio": ("audio_tower", "audio_model", "audio_encoder"),
}
# Modules inside a vision tower that map vision features to text: projector, not vision layers.
_IN_TOWER_PROJECTOR = re.compile(r"(merger|projector|connector|aligner|deepstack_merger_list)$")
_CROSS_ATTENTION = re.compile(r"(cross_attn|cross_attention|crossattention)$")
# Per-model_type corrections, applied after structural resolution. Keys: component -> module paths.
OVERRIDES: dict[str, dict[str, tuple[str, ...]]] = {}


class ComponentResolutionError(ValueError):
    """The model's parts could not be found as the config asks; says what was found instead."""


@dataclass(frozen=True)
class ComponentMap:
    """Module-path prefixes of each component, and how each was found (for ``explain``)."""

    model_type: str
    paths: dict[str, tuple[str, ...]]
    how: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, component: str) -> tuple[str, ...]:
        return self.paths.get(component, ())

    def component_of(self, name: str) -> str | None:
        """The component owning module ``name``: the longest matching prefix wins (merger in visual -> projector)."""
        best, best_len = None, -1
        for component, prefixes in self.paths.items():
            for prefix in prefixes:
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = component, len(prefix)
        return best

    def describe(self) -> str:
        parts = [f"{c}={list(p)}" for c, p in self.paths.items() if p]
        return f"{self.model_type}: " + (", ".join(parts) or "no components found")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel / tuner wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    while hasattr(model, "peft_config") and hasattr(model, "model") and not hasattr(model, "config"):
        model = model.model
    return model


def is_candidate_linear(module: nn.Module) -> bool:
    """Linear layers LoRA can wrap: not subclasses that change ``forward`` (Llama4's router returns a tuple)."""
    if not isinstance(module, LINEAR_TYPES):
        return False
    cls = type(module)
    if cls in LINEAR_TYPES:
        return True
    if cls.__module__.startswith("bitsandbytes"):  # quantized linears: PEFT has dedicated LoRA layers
        return True
    return all(cls.forward is base.forward for base in LINEAR_TYPES if isinstance(module, base))


def _subconfigs(config: PretrainedConfig) -> list[tuple[str, PretrainedConfig]]:
    keys = list(getattr(config, "sub_configs", {}) or {})
    keys += [k for k, v in vars(config).items() if isinstance(v, PretrainedConfig) and k not in keys]
    return [(k, getattr(config, k)) for k in keys if isinstance(getattr(config, k, None), PretrainedConfig)]


def _component_for_key(key: str) -> str | None:
    for fragment, component in _SUBCONFIG_COMPONENTS:
        if fragment in key:
            return component
    return None


def _shallowest(paths: list[str]) -> tuple[str, ...]:
    kept: list[str] = []
    for path in sorted(paths, key=lambda p: (p.count("."), p)):
        if not any(path == k or path.startswith(k + ".") for k in kept):
            kept.append(path)
    return tuple(kept)


def _towers_from_subconfigs(model: nn.Module) -> dict[str, list[str]]:
    config = getattr(model, "config", None)
    found: dict[str, list[str]] = {}
    if not isinstance(config, PretrainedConfig):
        return found
    by_id = {}
    for key, sub in _subconfigs(config):
        component = _component_for_key(key)
        if component is not None:
            by_id[id(sub)] = component
    models: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        sub = getattr(module, "config", None)
        if name and sub is not None and id(sub) in by_id and sub is not config:
            found.setdefault(by_id[id(sub)], []).append(name)
            if isinstance(module, PreTrainedModel):
                models.setdefault(by_id[id(sub)], []).append(name)
    # A tower is a model built from its sub-config. Blocks elsewhere built from the same sub-config (Kosmos-2's
    # projector holds an attention made from text_config) are not part of it.
    return {c: models.get(c) or names for c, names in found.items()}


def _towers_from_names(model: nn.Module, component: str) -> list[str]:
    wanted = _FALLBACK_NAMES[component]
    hits = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in wanted]
    return list(_shallowest(hits))[:4]


def _inside(name: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _excluded_linears(model: nn.Module) -> set[int]:
    """Output heads are never LoRA targets unless named explicitly."""
    excluded = set()
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # some remote-code models raise here
            head = None
        if head is not None:
            excluded.add(id(head))
    return excluded


def _projector_roots(model: nn.Module, towers: list[str]) -> list[str]:
    """Shallowest modules holding trainable weights outside every tower: the vision-to-text mapping.

    Parameters count, not only linears: Gemma 3's projector is a bare weight matrix plus a norm.
    """
    excluded = _excluded_linears(model)
    roots = []
    for name, module in model.named_modules():
        if not name or id(module) in excluded or _inside(name, towers) or is_embedding_path(name):
            continue
        if isinstance(module, nn.Embedding) or not any(True for _ in module.parameters(recurse=False)):
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if not any(t == prefix or t.startswith(prefix + ".") for t in towers):
                roots.append(prefix)
                break
    return list(_shallowest(roots))


def _in_tower_projectors(model: nn.Module, vision: tuple[str, ...]) -> list[str]:
    hits = [
        name
        for name, _ in model.named_modules()
        if _inside(name, vision) and name not in vision and _IN_TOWER_PROJECTOR.search(name.rsplit(".", 1)[-1])
    ]
    return list(_shallowest(hits))


def _cross_attention_blocks(model: nn.Module, language: tuple[str, ...]) -> list[str]:
    hits = [n for n, _ in model.named_modules() if _inside(n, language) and _CROSS_ATTENTION.search(n)]
    return list(_shallowest(hits))


def is_embedding_path(name: str) -> bool:
    """Embeddings and patch embeddings (``patch_embed.proj``, ``embeddings.patch_embedding``) are never targets."""
    return any("embed" in part for part in name.split("."))


def _text_only_backbone(model: nn.Module) -> str | None:
    """A plain language model (no towers at all): its transformers backbone is the language component."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    return None


def resolve_components(model: nn.Module) -> ComponentMap:
    """Locate each component on ``model`` (a transformers VLM, possibly wrapped by PEFT)."""
    model = unwrap_model(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    found = _towers_from_subconfigs(model)
    how = {c: "sub-config" for c in found}
    for component in ("vision", "language", "audio"):
        if not found.get(component):
            names = _towers_from_names(model, component)
            if names:
                found[component], how[component] = names, "name"
    if not found.get("vision") and not found.get("language"):
        text_model = _text_only_backbone(model)
        if text_model:
            found["language"], how["language"] = [text_model], "text-only model"
    paths: dict[str, tuple[str, ...]] = {c: _shallowest(p) for c, p in found.items()}
    for component, override in OVERRIDES.get(model_type, {}).items():
        paths[component], how[component] = tuple(override), "override"

    towers = [p for c in ("vision", "language", "audio", "qformer") for p in paths.get(c, ())]
    projector = _in_tower_projectors(model, paths.get("vision", ())) + _projector_roots(model, towers)
    if projector and "projector" not in how:
        paths["projector"], how["projector"] = _shallowest(projector), "structure"
    cross = _cross_attention_blocks(model, paths.get("language", ()))
    if cross and "cross_attention" not in how:
        paths["cross_attention"], how["cross_attention"] = tuple(cross), "structure"
    return ComponentMap(model_type=model_type, paths=paths, how=how)


_ATTENTION_NAME = re.compile(r"(attn|attention)", re.IGNORECASE)
_MLP_NAME = re.compile(r"(mlp|feed_?forward|ffn|intermediate|experts?$|^output$|moe)", re.IGNORECASE)
_MLP_CLASS = re.compile(r"(MLP|Mlp|FeedForward|Intermediate|Output|MoE|Moe)")
_ATTENTION_LEAF = re.compile(r"^(q|k|v|o|qkv|query|key|value|q_proj|k_proj|v_proj|o_proj|qkv_proj|out_proj|in_proj)$")
_MLP_LEAF = re.compile(r"^(fc\d?|up_proj|down_proj|gate_proj|gate_up_proj|wi|wi_0|wi_1|wo|w1|w2|w3|c_fc|dense_.*)$")


def module_kind(modules: dict[str, nn.Module], name: str) -> str:
    """'attention', 'mlp' or 'other', decided by the enclosing block (its attribute and class names).

    Ancestors are read from the leaf up to the numbered layer that holds them; attention wins over MLP because
    BERT-style attention blocks contain an ``output`` submodule.
    """
    parts = name.split(".")
    ancestors = []  # nearest first, up to the numbered layer that holds the leaf
    for depth in range(len(parts) - 1, 0, -1):
        if parts[depth - 1].isdigit():
            break
        ancestors.append(".".join(parts[:depth]))
    labels = []
    for path in ancestors:
        attr = path.rsplit(".", 1)[-1]
        cls = type(modules[path]).__name__ if path in modules else ""
        labels.append((attr, cls))
    if any(_ATTENTION_NAME.search(a) or "Attention" in c for a, c in labels):
        return "attention"
    if any(
        _MLP_NAME.search(a) or re.search(r"(MLP|Mlp|FeedForward|Intermediate|Output|MoE|Moe)", c) for a, c in labels
    ):
        return "mlp"
    leaf = parts[-1]
    if _ATTENTION_LEAF.match(leaf):
        return "attention"
    if _MLP_LEAF.match(leaf):
        return "mlp"
    return "other"


def is_router(modules: dict[str, nn.Module], name: str) -> bool:
    """MoE routers (``gate``/``router`` beside ``experts``) are never LoRA targets."""
    leaf = name.rsplit(".", 1)[-1]
    if "router" in leaf:
        return True
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return leaf in ("gate", "gate_proj_router") and f"{parent}.experts" in modules
