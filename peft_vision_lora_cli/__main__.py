"""``python -m peft_vision_lora_cli``: the same as the ``peft-vision-lora`` script."""

import sys

from . import main

sys.exit(main())
