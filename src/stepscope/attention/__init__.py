"""Hooking a model's attention through ``transformers``' AttentionInterface (no monkey-patching)."""

from .dispatch import AttentionCall, InstallHandle, attention_modules, install

__all__ = ["AttentionCall", "InstallHandle", "attention_modules", "install"]
