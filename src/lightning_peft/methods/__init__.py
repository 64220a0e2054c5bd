"""Adapter methods: each wraps a module of the user's model (composition, never subclassing)."""

from .base import AdapterModule
from .lora import LoraLayer
from .modules_to_save import ModulesToSave

__all__ = ["AdapterModule", "LoraLayer", "ModulesToSave"]
