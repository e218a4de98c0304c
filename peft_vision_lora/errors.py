"""The package's own exceptions: ``ValueError`` subclasses, so callers that catch ``ValueError`` keep working.

They live at the bottom of the dependency graph because both the config (tuner) and the resolver raise them.
"""

from __future__ import annotations


class VisionLoraConfigError(ValueError):
    """A VisionLoraConfig that cannot be honoured: bad values, or flags that select nothing."""


class ComponentResolutionError(ValueError):
    """The model's parts could not be found as the config asks; says what was found instead."""


class AdapterLoadError(ValueError):
    """Adapter weights do not fit the model: some weights match no module, or some adapted modules got none."""
