"""Write docs/coverage.md: every image-text-to-text model type of the installed transformers, what each component
resolves to, how many modules each strategy adapts, and the real language-only / vision-only shares of full-VLM LoRA
parameters at r=16 on the full-size default config (built on the meta device) against the design's claims.

Types without hand-written truth in ``tests/zoo_wide_truth.py`` (new in this transformers) are marked *structural
only*, with the result of the generic invariants (``peft_vision_lora.testing.zoo_invariants``) on their tiny model.

Usage: ``python scripts/make_coverage.py [--out docs/coverage.md] [--only TYPE ...]``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
import time
from pathlib import Path

import transformers

from peft_vision_lora.reports.inspection import fraction_of_full, strategy_counts
from peft_vision_lora.reports.strategies import DESIGN_CLAIMS
from peft_vision_lora.resolve.components import resolve_components
from peft_vision_lora.testing.zoo_invariants import structural_invariant_failures
from peft_vision_lora.zoo.catalog import (
    FULL_SIZE_ASSUMED,
    ZOO_MODEL_TYPES,
    ZooBuildError,
    build_full_size_on_meta,
    build_zoo_model,
)

RANK = 16
HEADER = (
    "| model type | vision | projector | language | cross-attention | other parts | modules V+L / L / V / P "
    "| language share | vision share |"
)
RULE = "|" + "---|" * (HEADER.count("|") - 1)
ROOT = Path(__file__).resolve().parents[1]


def _hand_checked_types() -> frozenset[str]:
    """Model types with hand-written truth (or a listed reason they cannot build), read from the tests."""
    spec = importlib.util.spec_from_file_location("zoo_wide_truth", ROOT / "tests" / "zoo_wide_truth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return frozenset(module.TRUTH) | frozenset(module.UNBUILDABLE)


HAND_CHECKED = _hand_checked_types()


def _paths(paths: tuple[str, ...]) -> str:
    """Module paths, layer indices folded to ``*`` (Granite's six window Q-Formers are one entry)."""
    folded = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", p) for p in paths))
    return "<br>".join(f"`{p}`" for p in folded) or "-"


def _share(counts, strategy: str) -> str:
    share = fraction_of_full(counts, strategy)
    if share is None:
        return "-"
    low, high = DESIGN_CLAIMS[strategy]
    verdict = "in claim" if low <= share <= high else ("above" if share > high else "below")
    return f"{share:.1%} ({verdict})"


def _structural_note(model_type: str, tiny) -> str:
    """What a type without hand truth is checked by: the generic invariants, and whether they hold."""
    failures = structural_invariant_failures(model_type, tiny)
    verdict = "hold" if not failures else "broken: " + "; ".join(failures)
    return f"**structural only** (no hand-written truth yet): generic invariants {verdict}"


def coverage_row(model_type: str, hand_checked: bool | None = None) -> tuple[str, dict[str, float | None]]:
    """The table row of one model type and its two shares (None when not computable).

    ``hand_checked`` defaults to whether the tests hold hand-written truth for the type.
    """
    hand_checked = model_type in HAND_CHECKED if hand_checked is None else hand_checked
    try:
        tiny = build_zoo_model(model_type, device="meta")  # the tiny build the tests run
    except ZooBuildError as error:
        reason = str(error).split(": ", 1)[-1]
        note = "" if hand_checked else " (structural only: unchecked until it builds)"
        return f"| {model_type} | not built here: {reason}{note} | | | | | | | |", {}
    try:
        model, size = build_full_size_on_meta(model_type), "full"
    except ZooBuildError:
        model, size = build_zoo_model(model_type, device="meta", max_params=None), "tiny"
    components = resolve_components(model)
    counts = strategy_counts(model, r=RANK)
    other = [] if hand_checked else [_structural_note(model_type, tiny)]
    other += [f"{c}: {_paths(components[c])}" for c in ("qformer", "audio") if components[c]]
    if components.excluded:
        other.append(f"never targeted: {_paths(components.excluded)}")
    if size == "tiny":
        other.append("shares from the tiny config (the default config does not build)")
    elif model_type in FULL_SIZE_ASSUMED:
        other.append("default config completed with assumed values (see `zoo._FULL_SIZE_FIXES`)")
    modules = " / ".join(
        str(counts[s].modules) if not counts[s].reason else "-"
        for s in ("vision+language", "language", "vision", "projector")
    )
    cells = [
        model_type,
        _paths(components["vision"]),
        _paths(components["projector"]),
        _paths(components["language"]),
        _paths(components["cross_attention"]),
        "<br>".join(other) or "-",
        modules,
        _share(counts, "language"),
        _share(counts, "vision"),
    ]
    shares = {s: fraction_of_full(counts, s) for s in ("language", "vision")}
    return "| " + " | ".join(cells) + " |", shares


def _summary(shares: dict[str, dict[str, float | None]], built: int, total: int) -> list[str]:
    structural = [t for t in shares if t not in HAND_CHECKED]
    lines = [
        f"- Built here: {built} of {total} model types (the others are listed with the reason).",
        f"- Hand-checked (written truth, or a written reason it cannot build here): {total - len(structural)}; "
        f"structural only (generic invariants, no truth yet): {len(structural)}"
        + (f" ({', '.join(structural)})." if structural else "."),
    ]
    for strategy in ("language", "vision"):
        values = [s[strategy] for s in shares.values() if s.get(strategy) is not None]
        low, high = DESIGN_CLAIMS[strategy]
        inside = sum(low <= v <= high for v in values)
        lines.append(
            f"- {strategy}-only share of full-VLM LoRA parameters (r={RANK}, full-size defaults): median "
            f"{statistics.median(values):.1%}, range {min(values):.1%}-{max(values):.1%}; within the design's claim "
            f"of {low:.0%}-{high:.0%} for {inside} of {len(values)} models."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "coverage.md"))
    parser.add_argument("--only", nargs="*", help="model types to print (no file is written)")
    args = parser.parse_args(argv)
    if args.only:
        for model_type in args.only:
            print(coverage_row(model_type)[0])
        return 0
    start = time.perf_counter()
    rows, shares = [], {}
    for model_type in ZOO_MODEL_TYPES:
        row, shares[model_type] = coverage_row(model_type)
        rows.append(row)
        print(f"{model_type}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    built = sum(1 for s in shares.values() if s)
    text = [
        "# Coverage: every image-text-to-text model type",
        "",
        f"Generated by `python scripts/make_coverage.py` with transformers {transformers.__version__}; do not edit "
        "by hand. Paths and counts come from each type's full-size default config built on the meta device "
        "(no weights). *Modules* counts the linears each strategy adapts: vision+language / language-only / "
        f"vision-only / projector-only (LoRA). *Shares* are LoRA parameters at r={RANK} of language-only and "
        "vision-only training over vision+language (cross-attention follows the language flag), set against the "
        "design's claims (language 50-70%, vision 30-50%). `-` means the strategy finds nothing on that model.",
        "",
        *_summary(shares, built, len(ZOO_MODEL_TYPES)),
        "",
        "Reading the numbers:",
        "",
        "- Default configs are the config classes' defaults, not always a released checkpoint (BLIP-2's default "
        "text model is a small OPT, so its vision share is high).",
        "- MoE language models: routed experts are fused 3-D parameters in transformers 5, not `nn.Linear`, so LoRA "
        "adapts attention and shared experts only and the language share is lower than the parameter count suggests. "
        "Routers are never adapted.",
        "- Q-Formers follow the projector flag, so the projector-only count includes them (BLIP-2, InstructBLIP, "
        "Granite 4 Vision). Cross-attention follows the language flag.",
        "- A projector with no linear layer (Gemma 3's bare weight matrix) shows `-`: train it with "
        "`finetune_projector='full'`.",
        "",
        HEADER,
        RULE,
        *rows,
        "",
    ]
    Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out} ({len(rows)} model types) in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
