"""Rendering helpers shared by commands: JSON to stdout, rich tables, human units."""

import json
import sys
from typing import Any

from rich.console import Console

stdout = Console(highlight=False, soft_wrap=False)
stderr = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def count(n: int | None) -> str:
    """Parameter counts: 46.70B, 12.9M, 4,096."""
    if n is None:
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:,}"


def size(n: int | None) -> str:
    """Bytes in decimal units (GB = 1e9 bytes), as model cards use."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
