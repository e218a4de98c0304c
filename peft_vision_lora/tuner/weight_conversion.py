"""PEFT's save-time conversion of PiSSA/OLoRA/CorDA/LoRA-GA adapters to plain LoRA, made to work for ``VISION_LORA``.

``PeftModel.save_pretrained(..., path_initial_model_for_weight_conversion=init_dir)`` saves the adapter as the
difference between the trained and the initial adapter (``[A | A0]``, ``[B | -B0]``: rank ``2r``), which loads on the
*original* base. Before that it re-saves ``init_dir``'s config with ``init_lora_weights=True`` so that loading the
initial adapter does not decompose the (already residual) base weights again; but it does so only for
``PeftType.LORA``. For any other type it sets ``init_weights=True`` (a field LoRA configs do not have), and
``LoraModel._convert_state_dict_for_initial_model`` then either raises, or, worse, has already run PiSSA on the
residual base while loading. :func:`prepare_conversion` does the LoRA step for our configs, and doubles the
per-component ranks and alphas along with PEFT's doubling of ``r``/``lora_alpha``/``rank_pattern``/``alpha_pattern``,
so that a config recompiled from the flags still describes the converted adapter.
"""

from __future__ import annotations

import copy
import math
from typing import Any

# Initialisations that change the base weights: an adapter trained from them needs the conversion to be portable.
MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")


def mutates_base_weights(init_lora_weights: Any) -> bool:
    """True for the inits whose adapter only makes sense on the residual base (PiSSA, OLoRA, CorDA, LoRA-GA)."""
    return isinstance(init_lora_weights, str) and init_lora_weights.lower().startswith(MUTATING_INITS)


def prepare_conversion(config: Any, path_initial_model: str) -> None:
    """Make PEFT's conversion of ``config`` (PEFT's private copy of the adapter's config) behave as for LoRA.

    Re-saves ``path_initial_model``'s config with ``init_lora_weights=True``, then marks ``config`` the same way and
    doubles ``component_r``/``component_alpha`` (PEFT doubles the rest after the weights are converted).
    """
    initial = copy.deepcopy(config)
    initial.init_lora_weights = True
    initial.save_pretrained(path_initial_model)
    config.init_lora_weights = True
    if getattr(config, "component_r", None):
        config.component_r = {component: 2 * r for component, r in config.component_r.items()}
    if getattr(config, "component_alpha", None):
        # PEFT keeps scaling alpha/r with r doubled by doubling alpha, or alpha/sqrt(r) by multiplying it by sqrt(2)
        factor = math.sqrt(2) if config.use_rslora else 2
        config.component_alpha = {component: factor * alpha for component, alpha in config.component_alpha.items()}
