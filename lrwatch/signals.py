"""Signals that end a watch: each one a clean end, never a silent death.

Ctrl-C (SIGINT, Windows' CTRL_C and CTRL_BREAK), SIGTERM (``kill``, systemd, ``docker stop``)
and SIGHUP (a closed terminal or ssh session) all raise :class:`Interrupted` in the watch
loop, which then says that the trainer is no longer guarded, prints the final audit and
exits with 128 + the signal's number, as a shell reports a process ended by it.

What happens to a trainer lrwatch launched follows what it would have received without
lrwatch in between: a terminal's Ctrl-C reaches lrwatch only (the trainer runs in its own
session so that stopping the watch never stops the training), while SIGTERM and SIGHUP mean
the whole job is going away (the container, the unit, the terminal) and are passed on to it.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

WINDOWS = sys.platform == "win32"
# Signals passed on to a launched trainer when lrwatch receives them.
PASSED_ON = frozenset(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Interrupted(BaseException):
    """A signal asked the watch to end. A BaseException, as KeyboardInterrupt is, so that the
    loop's guard against one bad pass (``except Exception``) never swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        # Windows has no shell convention for signals; its console interrupts count as Ctrl-C.
        if WINDOWS and self.signum != signal.SIGTERM:
            return 128 + signal.SIGINT
        return 128 + self.signum

    @property
    def passed_on(self) -> bool:
        """Whether a launched trainer is handed the same signal (see the module's docstring)."""
        return not WINDOWS and self.signum in PASSED_ON


def _handled() -> list[int]:
    names = ["SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"]
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


@contextmanager
def signals_end_the_watch() -> Iterator[None]:
    """While inside, each handled signal raises :class:`Interrupted` once. Later ones (a
    second ``kill``, systemd's repeated SIGTERM) are ignored so the final audit is printed,
    except a second Ctrl-C, which ends lrwatch at once as Python's default does. Outside the
    main thread (a library call from a worker) nothing is installed: only the main thread
    may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = _handled()
    before = {s: signal.getsignal(s) for s in handled}

    def ending(signum: int, frame: FrameType | None) -> None:
        for s in handled:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_IGN)
        raise Interrupted(signum)

    for s in handled:
        signal.signal(s, ending)
    closing = _console_close_handler() if WINDOWS else None
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if closing is not None:
            closing.remove()


class _ConsoleClose:
    """Windows: closing the console window, logging off or shutting down sends CTRL_CLOSE,
    CTRL_LOGOFF or CTRL_SHUTDOWN, which Python does not turn into a signal; the process is
    ended when the handler returns. The handler raises SIGTERM's Interrupted in the main
    thread and holds the process for up to 4.5 s (Windows allows 5) for the final audit."""

    def __init__(self) -> None:
        import _thread
        import ctypes

        self.done = threading.Event()
        self._kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined]
        prototype = ctypes.WINFUNCTYPE(ctypes.c_int, ctypes.c_uint)  # type: ignore[attr-defined]

        def on_event(event: int) -> int:
            if event not in (2, 5, 6):  # CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT
                return 0  # Ctrl-C and Ctrl-Break: Python's own handler turns them into signals
            _thread.interrupt_main(signal.SIGTERM)
            self.done.wait(4.5)
            return 1

        self._callback = prototype(on_event)  # kept referenced: Windows calls it later
        self._kernel32.SetConsoleCtrlHandler(self._callback, True)

    def remove(self) -> None:
        self.done.set()
        self._kernel32.SetConsoleCtrlHandler(self._callback, False)


def _console_close_handler() -> _ConsoleClose | None:
    try:
        return _ConsoleClose()
    except (OSError, AttributeError):  # no console (a service): there is no close event to catch
        return None
