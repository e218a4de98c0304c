"""``VisionLoraModel``: PEFT's ``LoraModel`` that compiles component flags on the real model before injecting.

Only two things differ from LoRA: ``inject_adapter`` resolves the components and writes the compiled targets into
the adapter's config (every PEFT path goes through it: ``get_peft_model``, ``add_adapter``, ``load_adapter``,
``PeftModel.from_pretrained``), and ``_create_new_module`` offers our kernel-backed Linear before PEFT's own
dispatchers. Layers stay PEFT LoRA layers, so weights keep LoRA's key names.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from ..errors import AdapterLoadError, ComponentResolutionError, VisionLoraConfigError
from ..kernels.dispatch import triton_unusable_reason
from ..resolve.components import resolve_components
from ..resolve.module_kinds import quantized_layer_path
from ..resolve.names import OTHER
from ..resolve.targets import apply_plan, compact_regex, compile_targets
from . import load_rollback
from .config import VisionLoraConfig
from .initializations import check_preprocessed
from .layer import dispatch_vision_lora
from .mixed_batch import mixed_batch_hooks
from .strict_load import remap_and_check
from .weight_conversion import prepare_conversion

logger = logging.getLogger(__name__)


class VisionLoraModel(LoraModel):
    """LoRA tuner for vision-language models; see :class:`~peft_vision_lora.config.VisionLoraConfig`."""

    prefix: str = "lora_"

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        ours = isinstance(config, VisionLoraConfig)
        if ours:
            refuse_unusable_kernel(config.kernel)
            if load_rollback.injected_for_a_load():
                load_rollback.snapshot(self, model, adapter_name)
        if ours and kwargs.get("state_dict") is None:
            if not config.is_resolved:
                check_preprocessed(config)
                plan = compile_targets(model, config)
                apply_plan(config, plan)
                if plan.skipped:
                    logger.info(
                        "Adapter '%s': %d module(s) skipped: %s", adapter_name, len(plan.skipped), plan.skipped[0][1]
                    )
            elif not _matches_any_module(model, config.target_modules):
                _recompile_for_layout(model, config, adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if ours:
            config.component_targets = _component_targets(model, adapter_name) or config.component_targets

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT's hooks (checks, per-sample names), then ours: tower rows mapped to samples (tuner/mixed_batch.py)."""
        adapter_names = kwargs.get("adapter_names")
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            if adapter_names is None:
                yield
                return
            with mixed_batch_hooks(self.model, adapter_names, kwargs):
                yield

    # ---- strict loading (see peft_vision_lora.tuner.strict_load) ----------------------------------------------------

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's remap, then: keys of an older transformers layout renamed (logged), and an exact fit demanded."""

        def remap(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return super(VisionLoraModel, cls)._remap_adapter_state_dict_for_load(model, config, adapter_name, weights)

        try:
            remapped = remap_and_check(remap, model, adapter_name, state_dict, config.base_model_name_or_path)
        except AdapterLoadError as error:
            raise AdapterLoadError(f"{error} {load_rollback.roll_back(model, adapter_name)}") from None
        tuner = load_rollback.find_tuner(model)
        if tuner is not None:
            load_rollback.forget(tuner, adapter_name)
        return remapped

    @classmethod
    def _convert_state_dict_for_initial_model(
        cls,
        peft_model: Any,
        peft_config: Any,
        path_initial_model_for_weight_conversion: str,
        output_state_dict: dict[str, torch.Tensor],
        kwargs: dict[str, Any],
    ) -> dict[str, torch.Tensor]:
        """PiSSA/OLoRA/CorDA/LoRA-GA -> plain LoRA on save, as PEFT does for ``PeftType.LORA`` (weight_conversion)."""
        prepare_conversion(peft_config, path_initial_model_for_weight_conversion)
        return super()._convert_state_dict_for_initial_model(
            peft_model, peft_config, path_initial_model_for_weight_conversion, output_state_dict, kwargs
        )

    def _get_module_names_tied_with_embedding(self) -> list[str]:
        # Some VLMs raise from get_input_embeddings (PP-FormulaNet); our targets never include embeddings unless
        # named, so an unknown tie is no reason to refuse the adapter.
        try:
            return super()._get_module_names_tied_with_embedding()
        except (NotImplementedError, AttributeError, ValueError) as error:
            warnings.warn(
                f"Could not determine weights tied to the input embeddings ({error}); assuming none.", stacklevel=2
            )
            return []

    def _check_merge_allowed(self) -> None:
        # every merge path (merge_adapter, merge_and_unload) passes here: say what merging into a k-bit base loses
        super()._check_merge_allowed()
        _warn_if_merging_into_quantized(self.model)

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        # Ours first: it takes only plain nn.Linear bases and returns None for the rest (bnb, GPTQ, Conv1D, ...),
        # which PEFT's own dispatcher chain then handles. Decided once here, never mid-forward.
        new_module = dispatch_vision_lora(target, adapter_name, config=lora_config, **kwargs)
        if new_module is not None:
            return new_module
        return LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)


# ---- helpers for injection ---------------------------------------------------------------------------------------


def refuse_unusable_kernel(kernel: str) -> None:
    """kernel='triton' where no Triton kernel can ever run: refused when the model is wrapped, not at the first
    forward (a CPU model that will move to CUDA later is fine when CUDA exists)."""
    reason = triton_unusable_reason() if kernel == "triton" else None
    if reason:
        raise VisionLoraConfigError(
            f"kernel='triton' cannot run here: {reason}. Use kernel='auto' (Triton on CUDA when available, torch "
            "otherwise) or kernel='torch'. For a saved adapter, load its config with "
            "VisionLoraConfig.from_pretrained, set config.kernel = 'auto' and pass config=... to "
            "PeftModel.from_pretrained."
        )


def _matches_any_module(model: nn.Module, target_modules: Any) -> bool:
    if not isinstance(target_modules, str):
        return True  # a list is matched by PEFT itself, which raises if nothing matches
    pattern = re.compile(target_modules)
    return any(pattern.fullmatch(name) for name, _ in model.named_modules())


def _recompile_for_layout(model: nn.Module, config: VisionLoraConfig, adapter_name: str) -> None:
    """The saved regex names modules of another module layout (transformers renamed them): recompile the flags.

    The weights are renamed with transformers' rules when they load, and the strict key check proves that both
    agree, so a wrong guess fails loudly instead of leaving modules without their adapter.
    """
    names = [name for name, _ in model.named_modules()]

    def live(patterns: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in (patterns or {}).items() if any(re.fullmatch(k, n) for n in names)}

    stale = config.target_modules
    config.rank_pattern, config.alpha_pattern = live(config.rank_pattern), live(config.alpha_pattern)
    apply_plan(config, compile_targets(model, config))
    logger.warning(
        "Adapter '%s': its saved target_modules match no module of this %s (saved for another module layout: %.80s); "
        "targets were recompiled from the component flags.",
        adapter_name,
        type(model).__name__,
        stale,
    )


def _component_targets(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """For each component, a regex matching exactly the modules that carry this adapter."""
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    if not adapted:
        return {}
    try:
        components = resolve_components(model)
    except ComponentResolutionError:
        return {}
    grouped: dict[str, set[str]] = {}
    for name in adapted:
        grouped.setdefault(components.component_of(name) or OTHER, set()).add(name)
    universe = [name for name, _ in model.named_modules()]
    return {component: compact_regex(names, universe) for component, names in sorted(grouped.items())}


def _warn_if_merging_into_quantized(model: nn.Module) -> None:
    """PEFT merges into a bnb base by dequantizing, adding the LoRA delta and re-quantizing. Say what that loses."""
    kinds: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            path = quantized_layer_path(module)
            if path is not None:
                kinds[path] = kinds.get(path, 0) + 1
    if not kinds:
        return
    counts = ", ".join(f"{n} {path.removeprefix('peft-')} layers" for path, n in sorted(kinds.items()))
    warnings.warn(
        f"Merging LoRA into a quantized base ({counts}): each merged weight is dequantized, the LoRA update added "
        "and the sum re-quantized, so the update is rounded to 4/8-bit precision and mostly lost when it is small "
        "next to the quantization step; the merged model's outputs differ from the unmerged adapter's, and "
        "unmerging does not restore the original base exactly. To keep the adapter exact, keep it unmerged, or "
        "load the base unquantized (bf16/fp16), attach the saved adapter with PeftModel.from_pretrained and "
        "merge_and_unload there.",
        UserWarning,
        stacklevel=3,
    )
