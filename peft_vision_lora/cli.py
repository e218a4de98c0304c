"""``peft-vision-lora`` command line; the parser lives in :mod:`peft_vision_lora_cli` so that ``--help`` is fast.

Kept so that ``python -m peft_vision_lora.cli`` and ``from peft_vision_lora.cli import main`` keep working.
"""

from __future__ import annotations

import sys

from peft_vision_lora_cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
