"""User-facing errors.

Anything a user can cause (a bad path, key, value or file) raises :class:`SamftError` with a message
that names the offending thing and says what was expected. The CLI prints the message alone and exits
non-zero; library users catch it like any exception.
"""

from __future__ import annotations

import re


class SamftError(Exception):
    """An error caused by user input (path, config key or value, data file, checkpoint)."""


class ConfigError(SamftError):
    """A config file, key or value is wrong."""


class DataError(SamftError):
    """A dataset file or layout is wrong."""


class CheckpointError(SamftError):
    """A checkpoint or adapter file does not match what is asked for."""


def pickle_refused(e: Exception) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a pickle that names Python code or objects (torch says
    "Unsupported global"; a file that is no pickle at all fails on an unsupported operand instead)."""
    lowered = str(e).lower()
    return "unsupported global" in lowered or bool(re.search(r"\bGLOBAL\b", str(e)))


def load_failure(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words that never repeat torch's own text: for a
    pickle that names Python code or objects, torch advises re-running with the unsafe loading flag, the one
    thing never to do with a file one did not make."""
    text = str(e)
    if pickle_refused(e):
        found = re.search(r"GLOBAL\s+([\w.]+)", text)
        which = f" ({found.group(1)[:80]})" if found else ""
        return (f"it contains Python code or objects{which}, not only tensors, and was not loaded (nothing in it "
                f"was run); samft reads only files of tensors")
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if unpickler or "weights only load failed" in text.lower():  # torch's advice is never quoted
        why = unpickler.group(1).strip().splitlines()[0][:120] if unpickler else "unreadable"
        return f"damaged or another kind of file; unpickling stopped at: {why}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first.split('. ')[0][:200]}"
