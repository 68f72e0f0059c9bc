"""What the PEFT methods' options may name in the encoder blocks, and the check of such a list (torch-free)."""

from __future__ import annotations

from samft.errors import ConfigError

LINEAR_TARGETS = ("qkv", "proj", "lin1", "lin2")


def check_choices(values: list[str], allowed: tuple[str, ...], key: str) -> None:
    """A non-empty list drawn from ``allowed``, else a ConfigError naming ``key``."""
    if not values:
        raise ConfigError(f"{key}: empty; choose from {', '.join(allowed)}")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{key}: unknown {unknown}; choose from {', '.join(allowed)}")


def check_targets(targets: list[str], prefix: str) -> None:
    check_choices(targets, LINEAR_TARGETS, f"{prefix}.targets")
