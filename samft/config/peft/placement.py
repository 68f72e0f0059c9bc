"""``peft.blocks``: which encoder blocks carry the PEFT method (torch-free).

Spellings: ``all`` (every block, the default), ``late:K`` (the last K blocks) or a list of block indices
(``[8, 9, 10, 11]`` in YAML, ``peft.blocks=8,9,10,11`` or ``peft.blocks=[8,9]`` on the command line). The value
is kept as one canonical string (``all``, ``late:4``, ``8,9,10,11``: sorted); its indices are resolved against
the model's depth when the model is built (:func:`resolve_blocks`), where an index out of range names the depth.
"""

from __future__ import annotations

from typing import Any

from samft.errors import ConfigError

ALL = "all"
_EXPECTED = "all, late:K (the last K blocks) or a list of block indices such as [8, 9, 10, 11]"


def normalise_blocks(value: Any) -> Any:
    """A YAML list or a single index as the canonical comma-separated string; other values unchanged (the field's
    check judges them)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _indices(text: str, key: str) -> list[int]:
    parts = [p.strip() for p in text.strip().strip("[]").split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"{key}: {text!r} is not {_EXPECTED}")
    indices = [int(p) for p in parts]
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise ConfigError(f"{key}: block(s) {twice} listed twice in {text!r}")
    return sorted(indices)


def canonical_blocks(spec: str, key: str = "peft.blocks") -> str:
    """``spec`` checked and written canonically; a ConfigError naming ``key`` and what is accepted otherwise."""
    text = str(spec).strip()
    if text == ALL:
        return ALL
    if text.startswith("late:"):
        count = text[len("late:"):].strip()
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"{key}: {text!r}: late:K needs a whole number K >= 1 (the last K blocks)")
        return f"late:{int(count)}"
    return ",".join(str(i) for i in _indices(text, key))


def resolve_blocks(spec: str, depth: int, model: str, key: str = "peft.blocks") -> tuple[int, ...]:
    """The block indices ``spec`` names in an encoder of ``depth`` blocks (``model`` names it in errors)."""
    text = canonical_blocks(spec, key)
    if text == ALL:
        return tuple(range(depth))
    if text.startswith("late:"):
        count = int(text[len("late:"):])
        if count > depth:
            raise ConfigError(f"{key}: {text} asks for {count} blocks, but {model} has {depth} encoder blocks")
        return tuple(range(depth - count, depth))
    indices = [int(i) for i in text.split(",")]
    outside = [i for i in indices if i >= depth]
    if outside:
        raise ConfigError(f"{key}: block index {outside[0]} is out of range: {model} has {depth} encoder blocks "
                          f"(0..{depth - 1})")
    return tuple(indices)


def describe_blocks(indices: tuple[int, ...], depth: int) -> str:
    """How a resolved placement reads (``samft info``, adapter metadata): ``all``, ``8-11 of 12``, ``0,5 of 12``."""
    if tuple(indices) == tuple(range(depth)):
        return ALL
    if indices and list(indices) == list(range(indices[0], indices[-1] + 1)) and len(indices) > 2:
        return f"{indices[0]}-{indices[-1]} of {depth}"
    return f"{','.join(map(str, indices))} of {depth}"
