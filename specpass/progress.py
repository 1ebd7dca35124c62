"""Progress on long work: a tqdm bar on a terminal, one line per stage anywhere else (a log file, CI).

tqdm redraws its bar in place with carriage returns; written to a file or a CI log, every redraw becomes a line
(thousands for one calibration). So a bar is drawn only when stderr is a terminal; otherwise a stage prints one
line when it ends: what it did, how many steps, how long it took. ``$SPECPASS_PROGRESS`` overrides the choice
(``bar``, ``lines`` or ``off``).
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm

STYLES = ("bar", "lines", "off")


def style() -> str:
    """How progress is shown in this process: ``$SPECPASS_PROGRESS``, else a bar on a terminal, else lines."""
    value = os.environ.get("SPECPASS_PROGRESS", "").strip().lower()
    if value in STYLES:
        return value
    return "bar" if sys.stderr.isatty() else "lines"


def progress_bar(iterable=None, *, desc: str, total: float | None = None, unit: str = "it", enabled: bool = True):
    """A tqdm bar, or a stand-in with tqdm's interface that prints one line when it is closed."""
    shown = style() if enabled else "off"
    if shown == "bar":
        return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True)
    return _Lines(iterable, desc=desc, total=total, unit=unit, quiet=shown == "off")


class _Lines:
    """tqdm's interface (iteration, ``update``, ``set_postfix``, a context manager), one line at the end."""

    def __init__(self, iterable, *, desc: str, total, unit: str, quiet: bool):
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.unit = unit
        self.quiet = quiet
        self.n = 0
        self.postfix = ""
        self.start = time.perf_counter()
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.quiet:
            return
        done = f"{self.n:g}/{self.total:g}" if self.total is not None else f"{self.n:g}"
        extra = f" ({self.postfix})" if self.postfix else ""
        elapsed = time.perf_counter() - self.start
        print(f"{self.desc}: {done} {self.unit} in {elapsed:.1f} s{extra}", file=sys.stderr, flush=True)
