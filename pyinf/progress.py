"""Progress bars for passes over data: on when stderr is a terminal, off when asked
(``progress=False``) or when not a TTY (logs, CI)."""
from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm.auto import tqdm


def progress_enabled(progress: Optional[bool]) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def bar(iterable: Iterable, *, desc: str, total: Optional[int], progress: Optional[bool]):
    return tqdm(iterable, desc=desc, total=total, disable=not progress_enabled(progress),
                unit="batch", dynamic_ncols=True, leave=False)
