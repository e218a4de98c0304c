"""What an adapter trains, read off a model: ``explain``, the per-strategy parameter report, ``inspect``'s tables,
and quantized memory footprints."""

from .explain import ExplainRow, explain
from .memory import quantized_footprint
from .strategies import StrategyRow, print_strategy_report, strategy_report

__all__ = ["ExplainRow", "StrategyRow", "explain", "print_strategy_report", "quantized_footprint", "strategy_report"]
