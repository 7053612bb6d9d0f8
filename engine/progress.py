"""Progress of long jobs.

Every long method takes ``progress``: a callable ``progress(stage, done, total)`` called after each
unit of work (an attribution batch, a batched forward, a MELBO vector, a DCT iteration, a generate
call), for tools that embed causalscan. The CLI passes :class:`Bars`: one tqdm bar per stage on
stderr, with the total and an ETA. Notes that are not progress (a resumed checkpoint) go to the
``causalscan`` logger.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from causalscan.errors import InputError

Progress = Callable[[str, int, int], None]
log = logging.getLogger("causalscan")


def check(progress) -> None:
    """:class:`InputError` unless ``progress`` is None or callable."""
    if progress is not None and not callable(progress):
        raise InputError(
            f"must be a callable progress(stage, done, total) or None, not {progress!r:.60}", field="progress"
        )


def report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    """Call ``progress`` if there is one."""
    if progress is not None:
        progress(stage, done, total)


class Bars:
    """``progress(stage, done, total)`` as tqdm bars on stderr, one per stage (closed when done)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bars = enabled, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True, leave=True)
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
