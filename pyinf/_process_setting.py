"""A process-wide setting (a torch flag or config value) changed for the duration of a pass.

Passes may overlap in threads (shards of a staged fit): a save and restore per pass let the
second pass restore the first one's change for good. Here the first pass in saves the
setting and the last one out restores it."""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable


class ProcessSetting:
    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None]):
        self._get, self._set = get, set
        self._lock = threading.Lock()
        self._users = 0  # scopes open now, in any thread
        self._saved: Any = None  # the value the first of them found

    @contextlib.contextmanager
    def changed(self, value: Callable[[Any], Any]):
        """Inside, the setting is ``value(what it was before any open scope)``."""
        with self._lock:
            saved = self._get() if self._users == 0 else self._saved
            self._set(value(saved))  # counted only once it took effect (a setter may raise)
            self._saved, self._users = saved, self._users + 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._set(self._saved)
