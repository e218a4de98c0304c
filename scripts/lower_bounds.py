"""Print ``name==lowest`` for the named dependencies of pyproject.toml, from their ``>=`` lower bounds.

``make test-oldest`` installs these on top of the lock, so the oldest versions that users may have are tested too.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def lower_bounds(names: list[str]) -> list[str]:
    """The pins; a name without a ``>=`` bound in pyproject's dependencies is an error."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    bounds = {}
    for requirement in dependencies:
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*[^;]*?>=\s*([0-9][^,;\s]*)", requirement)
        if match:
            bounds[match.group(1).lower()] = match.group(2)
    missing = [name for name in names if name.lower() not in bounds]
    if missing:
        raise SystemExit(f"no '>=' lower bound in pyproject.toml dependencies for {missing}")
    return [f"{name}=={bounds[name.lower()]}" for name in names]


if __name__ == "__main__":
    print(" ".join(lower_bounds(sys.argv[1:])))
