"""The ``peft-vision-lora`` command line, kept outside the ``peft_vision_lora`` package so that it answers fast.

Importing ``peft_vision_lora`` registers the tuner with PEFT, and importing PEFT takes seconds (about 8 s on a busy
2-core machine). Python imports a package before any of its submodules, so a parser inside the package could never
answer ``--help`` before PEFT is loaded. This package imports nothing but the standard library at the top; each
command imports what it needs when it runs.

Every error is printed once, to stderr, as ``peft-vision-lora COMMAND: error: MESSAGE``, with exit status 2 for a
bad argument (as argparse does, and for a model or folder that cannot be read) and 1 for a command that failed.
Errors other than ``ValueError``/``OSError`` are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "Inspect which parts of a vision-language model LoRA would train, inspect a saved adapter, or export an "
    "adapter as plain PEFT LoRA."
)


def positive_int(text: str) -> int:
    """argparse type: a rank must be a positive integer, refused before anything is built."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (a LoRA rank), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-vision-lora", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    inspect = commands.add_parser(
        "inspect",
        help="show a model's components and what each strategy would train, or what a saved adapter holds",
        description="Without downloading anything: build the model on the meta device from a model_type or a "
        "local config.json and show its components and the LoRA parameters of each strategy; or, for an adapter "
        "folder, show its components, ranks and parameter counts from its config and weights.",
    )
    inspect.add_argument(
        "model",
        metavar="MODEL",
        help="a transformers model_type (e.g. llava, qwen2_vl), a local model folder with config.json, or a saved "
        "adapter folder with adapter_config.json",
    )
    inspect.add_argument(
        "--full-size",
        action="store_true",
        help="for a model_type: use its default (full-size) config instead of a tiny one; built on meta, no memory",
    )
    inspect.add_argument(
        "-r", "--rank", type=positive_int, default=16, help="LoRA rank used to count parameters (default: 16)"
    )

    export = commands.add_parser(
        "export",
        help="write an adapter as plain PEFT LoRA (loads without this package)",
        description="Copy an adapter folder as plain PEFT LoRA (peft_type LORA, same tensors): PEFT alone, and "
        "serving stacks, load the copy.",
    )
    export.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder written by save_pretrained")
    export.add_argument("out_dir", metavar="OUT_DIR", help="new folder for the plain LoRA copy (replaced if present)")
    export.add_argument(
        "--language-only", action="store_true", help="keep only the language model's adapters (for vLLM, SGLang)"
    )
    export.add_argument(
        "--fold-scaling",
        action="store_true",
        help="fold each module's alpha/r into lora_B, for loaders that read one global alpha/r (vLLM)",
    )
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from peft_vision_lora.reports.inspection import run_inspect

        return run_inspect(args)
    from peft_vision_lora.sharing.export import run_export

    return run_export(args)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status (0 on success)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, OSError) as error:  # user errors; anything else is a bug and keeps its traceback
        print(f"peft-vision-lora {args.command}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_status", 1)
