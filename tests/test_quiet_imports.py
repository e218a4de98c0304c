"""The bitsandbytes kernels-community notice stays off the first screen; nothing else of bitsandbytes is hidden."""

import logging
import subprocess
import sys

import pytest

from peft_vision_lora.quiet_imports import BNB_CPU_LOGGER, KERNELS_COMMUNITY_NOTICE

NOTICE = (
    KERNELS_COMMUNITY_NOTICE + ": %s. Please make sure you already `pip install kernels` and the kernels >= 0.11.1"
)


def _emit_in_fresh_process(statement: str) -> str:
    """Import the package in a new interpreter, then log as bitsandbytes does; return what reached stderr."""
    code = f"import logging, peft_vision_lora\nlog = logging.getLogger({BNB_CPU_LOGGER!r})\n{statement}\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return result.stderr


@pytest.mark.slow
def test_notice_is_not_printed_but_other_bitsandbytes_warnings_are():
    stderr = _emit_in_fresh_process(f"log.warning({NOTICE!r}, 'offline')\nlog.warning('a real bitsandbytes problem')")
    assert KERNELS_COMMUNITY_NOTICE not in stderr
    assert "a real bitsandbytes problem" in stderr


def test_notice_is_kept_at_debug_level(caplog):
    logger = logging.getLogger(BNB_CPU_LOGGER)
    with caplog.at_level(logging.DEBUG, logger=BNB_CPU_LOGGER):
        logger.warning(NOTICE, "offline")
        logger.error("another message")
    levels = {record.getMessage().split(":")[0]: record.levelname for record in caplog.records}
    assert levels == {KERNELS_COMMUNITY_NOTICE: "DEBUG", "another message": "ERROR"}


def test_notice_is_dropped_when_debug_is_off(caplog):
    logger = logging.getLogger(BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        logger.warning(NOTICE, "offline")
        logger.warning("Failed to load something else")
    assert [record.getMessage() for record in caplog.records] == ["Failed to load something else"]
