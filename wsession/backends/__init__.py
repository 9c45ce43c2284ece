"""Registries: where live sessions are kept. ``MemoryRegistry`` is the default."""

from ._base import SessionRegistry
from .memory import MemoryRegistry

__all__ = ["MemoryRegistry", "SessionRegistry"]
