"""Errors raised by shrinkflow. Every message names the bad value and what was expected."""

from __future__ import annotations


class ShrinkflowError(Exception):
    """Base class for every error shrinkflow raises on purpose."""


class SpecError(ShrinkflowError, ValueError):
    """Raised when a spec, recipe, budget or CLI option is invalid (bad field, unknown choice)."""


class UnsupportedModelError(ShrinkflowError):
    """Raised when a model cannot go through a technique or cannot be exported for deployment."""


class ArtifactError(ShrinkflowError):
    """Raised when a stored artifact is missing, corrupt, or its checksum does not match."""


class PromotionError(ShrinkflowError):
    """Raised when a promotion cannot be completed; the previous champion stays in force."""


class TrialStopped(ShrinkflowError):
    """A search trial's training was stopped by the search's pruner (it fell behind); the message
    starts with "pruned:" and says where."""
