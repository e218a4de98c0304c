"""``peft-vision-lora`` command line: ``inspect`` a model's components, ``export`` an adapter as plain LoRA."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-vision-lora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="show a model's components and what each strategy would train")
    inspect.add_argument("model", help="a transformers model_type (e.g. llava) or a local model folder")
    inspect.add_argument("--full-size", action="store_true", help="use the default (full-size) config, on meta")
    inspect.add_argument("-r", "--rank", type=int, default=16)

    export = commands.add_parser("export", help="write an adapter as plain PEFT LoRA (loads without this package)")
    export.add_argument("adapter_dir")
    export.add_argument("out_dir")
    export.add_argument("--language-only", action="store_true", help="keep only language-model adapters")
    export.add_argument(
        "--fold-scaling", action="store_true", help="fold each module's alpha/r into lora_B (for vLLM-style loaders)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        from .reports.inspection import run_inspect

        return run_inspect(args)
    if args.command == "export":
        from .sharing.export import run_export

        return run_export(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
