"""Where in the user's code a capture stands: the innermost user frame (not torch's, not topofx's, not
the standard library's), for error messages that name the user's line and for the tracer's "is this
the user's Python?" test."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import linecache
import os
import sys
import sysconfig
import traceback
from typing import Any, Callable, Sequence

import torch

_TOPOFX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # topofx/


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class CaptureError(RuntimeError):
    """The supernet could not be captured as one graph; the message names the user's code."""


@dataclasses.dataclass
class UserFrame:
    """The innermost frame of user code (outside torch and topofx) at some point of tracing."""

    filename: str
    lineno: int
    line: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}: `{self.line.strip()}`"


@functools.lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(os.path.join(_TOPOFX_DIR, "zoo")):
        return False  # the built-in supernets are user code as far as error messages go
    return path.startswith(_TOPOFX_DIR) or path.startswith(_TORCH_DIR) or "<" in filename


_STDLIB_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")})
_NUMPY_SPEC = importlib.util.find_spec("numpy")  # torch's array companion: reads only what it is handed
_NUMPY_DIRS = tuple(os.path.abspath(d) for d in (_NUMPY_SPEC.submodule_search_locations or ())) if _NUMPY_SPEC else ()


@functools.lru_cache(maxsize=4096)
def _reads_nothing(filename: str) -> bool:
    """Code whose Python reads cannot be what the user changes between steps: the standard library,
    numpy, torch, topofx (other installed packages, NNI's model spaces say, are user code here)."""
    path = os.path.abspath(filename)
    in_stdlib = path.startswith(_STDLIB_DIRS) and "-packages" not in path
    return in_stdlib or bool(_NUMPY_DIRS) and path.startswith(_NUMPY_DIRS) or _is_library_file(filename)


def user_frame(frames: Sequence[traceback.FrameSummary] | None = None) -> UserFrame | None:
    """The innermost frame not in torch or topofx (default: the current Python stack, walked from the
    innermost frame outwards with only the found frame's line read: the tracer asks for every node it
    records, and extracting the whole stack with every line cost a deep model's trace seconds)."""
    if frames is None:
        frame = sys._getframe(1)
        while frame is not None:
            filename = frame.f_code.co_filename
            if not _is_library_file(filename):
                return UserFrame(filename, frame.f_lineno or 0, linecache.getline(filename, frame.f_lineno or 0).strip())
            frame = frame.f_back
        return None
    for fs in reversed(frames):
        if not _is_library_file(fs.filename):
            return UserFrame(fs.filename, fs.lineno or 0, fs.line or "")
    return None


def _code_at(function: Callable[..., Any]) -> UserFrame | None:
    """Where ``function`` is defined, as a frame of its first line (``None`` where there is no source)."""
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    return UserFrame(code.co_filename, code.co_firstlineno, linecache.getline(code.co_filename, code.co_firstlineno))


def _where(what: str, fix: str = "") -> str:
    frame = user_frame()
    at = f"at {frame}" if frame else "(no user frame found)"
    return f"{what} {at}" + (f". {fix}" if fix else "")
