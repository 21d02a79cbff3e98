"""The pause switch: roll adapters back to the base model without restarting anything.

While paused, Adapt answers FAILED_PRECONDITION with details starting "paused:" and the trailing
metadata `chameleon-state: paused`; the plugins then serve the base model and count the fallback as
"paused". GetManifest and health keep answering, so nothing restarts or reconnects. Paused while the
pause file exists (checked at most every CHECK_SECONDS, so a call costs no stat) or from SIGUSR1 until
SIGUSR2.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
CHECK_SECONDS = 0.5
STATE_METADATA = ("chameleon-state", "paused")
PAUSED_DETAILS = "paused: the operator paused adapter generation; serve the base model"


class PauseSwitch:
    def __init__(self, path: Path | None = None, on_change: Callable[[bool], None] | None = None) -> None:
        self.path = path
        self._on_change = on_change
        self._lock = threading.Lock()
        self._manual = False
        self._file = False
        self._checked = float("-inf")
        self._state = False

    @property
    def paused(self) -> bool:
        """The current state; stats the pause file only when the last look is older than CHECK_SECONDS."""
        if self.path is not None and time.monotonic() - self._checked >= CHECK_SECONDS:
            self.refresh()
        return self._state

    def refresh(self) -> bool:
        """Look at the pause file now; log and report a change of state."""
        with self._lock:
            if self.path is not None:
                self._file = self.path.exists()
                self._checked = time.monotonic()
            return self._update()

    def set_manual(self, paused: bool) -> None:
        """The operator's switch (SIGUSR1 pauses, SIGUSR2 resumes); the pause file, if present, still wins."""
        with self._lock:
            self._manual = paused
            self._update()

    def _update(self) -> bool:
        state = self._manual or self._file
        if state != self._state:
            self._state = state
            reasons = [r for r, on in (("signal", self._manual), ("pause file", self._file)) if on]
            if state:
                log.warning(
                    "paused: Adapt answers FAILED_PRECONDITION",
                    extra={"reason": ", ".join(reasons), "pause_file": str(self.path) if self.path else None},
                )
            else:
                log.warning("resumed: Adapt serves adapters again")
            if self._on_change is not None:
                self._on_change(state)
        return state
