"""The tiny VLMs under their first name (docs and users' scripts import it); they live in :mod:`.zoo.tiny`."""

from .zoo.tiny import *  # noqa: F403
from .zoo.tiny import __all__ as __all__
