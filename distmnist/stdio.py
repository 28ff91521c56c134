"""stdout and stderr that a reader going away cannot break: the output stops, the command goes on.

A pipe whose reader quit (``distmnist train ... | head -2``), a terminal that hung up, a log file on
a full disk: a write raises OSError there (Python ignores SIGPIPE, so a closed pipe is a
BrokenPipeError), and at a print deep inside a training run that would end the run with its records
half written. Behind ``guard()`` every write and flush that fails points the stream's file
descriptor at /dev/null instead (the remedy Python's documentation gives for SIGPIPE), so every
later write, this process's, a library's or C code's, succeeds and goes nowhere. A stream that was
closed before the process started gets /dev/null too, so that no file the command opens later can
land on descriptor 1 or 2 and receive what C code writes there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

LOST = (OSError, ValueError)  # ValueError: "I/O operation on closed file"


class Outlet:
    """A text stream (sys.stdout, sys.stderr) whose failed writes silence it instead of raising."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lost = False  # the reader went away: nothing is written any more

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                return self.stream.write(text)
            except LOST:
                self._lose()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.lost:
            try:
                self.stream.flush()
            except LOST:
                self._lose()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ...: the stream's own
        return getattr(self.stream, name)

    def _lose(self) -> None:
        self.lost = True
        try:
            fd = self.stream.fileno()
        except (*LOST, AttributeError):  # a StringIO, a closed stream: nothing below it to redirect
            return
        point_at_devnull(fd)
        try:
            self.stream.flush()  # what is still buffered goes to /dev/null, not to a later exception
        except LOST:
            pass


def point_at_devnull(fd: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)


def _reopen_closed(fd: int) -> None:
    """A descriptor closed before the process started (``>&-``): /dev/null in its place."""
    try:
        os.fstat(fd)
    except OSError:
        point_at_devnull(fd)


def guard() -> Callable[[], None]:
    """Put Outlets on sys.stdout and sys.stderr (a missing one: /dev/null); returns what undoes it."""
    saved = sys.stdout, sys.stderr
    opened = []
    for name, fd in (("stdout", 1), ("stderr", 2)):
        _reopen_closed(fd)
        stream = getattr(sys, name)
        if stream is None:  # Python found the descriptor closed at start-up
            stream = open(os.devnull, "w")
            opened.append(stream)
        if not isinstance(stream, Outlet):
            setattr(sys, name, Outlet(stream))

    def undo() -> None:
        sys.stdout, sys.stderr = saved
        for stream in opened:
            stream.close()

    return undo


def say(line: str) -> None:
    """One line on stderr, now; nothing if there is no stderr or it is gone."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except LOST:
        pass


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except LOST:
            pass
