"""Progress of long work: a bar in Jupyter and on a terminal (tqdm), plain lines otherwise."""

from __future__ import annotations

import math
import sys
import time


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def make(progress: bool | None, label: str) -> object | None:
    """The progress object the native module calls: ``True`` a bar, ``False`` nothing, ``None``
    a bar where someone watches (Jupyter, a terminal) and a few plain lines otherwise."""
    if progress is False:
        return None
    if progress or _interactive():
        return _Bar(label)
    return _Lines(label)


class _Bar:
    """A tqdm bar per phase; training phases count epochs."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = None
        self.epochs_of: tuple[int, int, int, int] | None = None
        self.done = 0

    def begin(self, phase: str, total: int) -> None:
        from tqdm.auto import tqdm

        self.end()
        self.done = 0
        desc = phase if phase.startswith(self.label) else f"{self.label}: {phase}"
        self.bar = tqdm(total=total, desc=desc, unit="cell", unit_scale=True, dynamic_ncols=True)

    def epochs(self, cells_per_epoch: int, resumed: int, first: int, last: int) -> None:
        self.epochs_of = (cells_per_epoch, resumed, first, last)
        self._describe()

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if self.epochs_of is not None:
                self._describe()

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
        self.epochs_of = None

    def _describe(self) -> None:
        if self.bar is None or self.epochs_of is None:
            return
        cells, resumed, first, last = self.epochs_of
        epoch = min(first + (self.done + resumed) // max(cells, 1) + 1, last)
        self.bar.set_description_str(f"{self.label}: epoch {epoch}/{last}", refresh=False)


class _Lines:
    """Plain lines on stderr: a phase's start and end, and training's notes at most every 10 s."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.phase = ""
        self.started = 0.0
        self.last_note = -math.inf

    def _print(self, text: str) -> None:
        # Phases often repeat the label ("evaluate: statistics"): say it once.
        text = text.removeprefix(f"{self.label}: ").removeprefix(f"{self.label} ")
        print(f"cpa_stream {self.label}: {text}", file=sys.stderr, flush=True)

    def begin(self, phase: str, total: int) -> None:
        self.phase, self.started = phase, time.monotonic()
        self._print(f"{phase}: {total:,} to do")

    def epochs(self, cells_per_epoch: int, resumed: int, first: int, last: int) -> None:
        self._print(f"epochs {first + 1} to {last}, {cells_per_epoch:,} cells each")

    def advance(self, n: int) -> None:
        pass

    def note(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last_note >= 10:
            self.last_note = now
            self._print(text)

    def end(self) -> None:
        self._print(f"{self.phase}: done in {time.monotonic() - self.started:.1f} s")
