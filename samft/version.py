"""The package version: a bottom module that every layer may import (the package root imports the engine)."""

__version__ = "0.1.0"
