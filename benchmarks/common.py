"""Command-line options every benchmark shares, so that ``--repeats``/``--threads``/... mean the same in each script.

Only the trailing block common to all scripts lives here (it is added last, so ``--help`` keeps each script's order);
options whose defaults or place differ per script (``--dropout``, ``--dtype``, shapes) stay in the scripts.
"""

from __future__ import annotations

import argparse

import torch


def add_common_args(parser: argparse.ArgumentParser, repeats: int, warmup: int) -> None:
    """Add ``--repeats --warmup --device --threads --csv``; the round counts differ per script, so they are passed."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--csv", help="append result rows to this CSV file")


def apply_common_args(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` (before any work, so every case runs with the same thread count) and return the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)
