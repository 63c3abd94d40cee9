"""Progress bars on stderr, the one implementation every layer uses (training, demo, commands).

`tqdm_bar` is a tqdm bar the caller advances itself; `progress_bar` wraps one into the
`update(done, total)` callback that collection and evaluation functions accept. Neither starts a
background thread: the package turns tqdm's monitor thread off on import (see `dit4dit/__init__.py`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

__all__ = ["progress_bar", "tqdm_bar"]


def tqdm_bar(total: int, desc: str, *, initial: int = 0, unit: str = "it", leave: bool = True,
             smoothing: float = 0.3) -> Any:
    """A tqdm bar on stderr sized to the terminal; the caller calls ``update``/``close`` on it."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, smoothing=smoothing,
                file=sys.stderr, dynamic_ncols=True)


def progress_bar(total: int, desc: str) -> Callable[[int, int], None]:
    """A bar on stderr driven by ``update(done, total)`` callbacks; it closes when done >= total."""
    bar = tqdm_bar(total, desc)

    def update(done: int, _total: int) -> None:
        bar.n = done
        bar.refresh()
        if done >= _total:
            bar.close()

    return update
