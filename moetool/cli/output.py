"""Rendering helpers shared by commands: JSON to stdout, rich tables, human units."""

import json
import math
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

from moetool import __version__

stdout = Console(highlight=False, soft_wrap=False)
stderr = Console(stderr=True, highlight=False)


def esc(text: str) -> str:
    """TEXT (a path, a name, a message) to print as it is, not as rich markup ("[/b]" in a path)."""
    return escape(text)


def report_json(data: dict, out=None) -> dict:
    """A plan or summary as the reports' JSON: the schema and version first, OUT (None: not written)."""
    return {"schema_version": 1, "moetool_version": __version__, "out": None if out is None else str(out), **data}


def emit_json(data: Any) -> None:
    """DATA as strict JSON: NaN and infinities (a weight holding NaN has a NaN norm) become null."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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


class PassProgress:
    """Progress of a run on stderr: one bar per pass (a full-mode forward, or one decoder layer of a
    streamed run: "layer i/N"), in tokens, with tokens/s and the time left."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._label = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TaskProgressColumn(), TextColumn("{task.fields[rate]} tokens/s"),
                                 TimeRemainingColumn(), console=stderr, transient=True)
            self._bar.start()
        return self

    def update(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if label != self._label:
            if self._label is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(label, total=total, rate="")
            self._label = label
        task = self._bar.tasks[-1]
        rate = f"{task.speed:,.0f}" if task.speed else ""
        self._bar.update(self._task, completed=done, total=total, rate=rate)

    def close(self) -> None:
        """Stop showing (rich shows one live display at a time: call before another bar starts)."""
        if self.enabled:
            self._bar.stop()
            self.enabled = False

    def __exit__(self, *exc):
        self.close()
