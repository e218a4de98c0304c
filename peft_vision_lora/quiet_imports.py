"""Keep one known, harmless third-party notice off the first screen of every import of this package.

bitsandbytes (imported by PEFT when installed) logs a WARNING on CPUs with AVX512-BF16 when the optional ``kernels``
package cannot fetch its fused 4-bit CPU GEMM from the Hub: "Failed to load CPU gemm_4bit_forward from
kernels-community ...". bitsandbytes then uses its own CPU path, which gives the same numbers, so the line only costs
users the top of ``make demo`` and of every CLI call. The filter drops that one message from that one logger; every
other record of bitsandbytes, and that message at DEBUG level for whoever asks, still gets through.
Importing this module installs the filter (``peft_vision_lora/__init__.py`` imports it first).
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_COMMUNITY_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DemoteKernelsCommunityNotice(logging.Filter):
    """Turn the notice into a DEBUG record (shown only when DEBUG is enabled), pass everything else unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and str(record.msg).startswith(KERNELS_COMMUNITY_NOTICE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quiet_bitsandbytes_kernel_notice() -> None:
    """Install the filter once; safe to call before or after bitsandbytes is imported."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DemoteKernelsCommunityNotice) for f in logger.filters):
        logger.addFilter(_DemoteKernelsCommunityNotice())


quiet_bitsandbytes_kernel_notice()
