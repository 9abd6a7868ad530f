"""The tests' one way to wait for a condition: poll it with a deadline.

For state nothing announces (Redis keys, lock state, a process's log file). Where there is
an event, signal or log record to wait on, wait on that instead; never a fixed sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy (bounded); return that."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
