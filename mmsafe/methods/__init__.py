"""Training objectives, one file per method, selected by name (`get`)."""

from mmsafe.methods import crmt  # noqa: F401  (registers "crmt", "crmt_at", ...)
from mmsafe.methods import jt  # noqa: F401  (registers "jt", "ojt")
from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.registry import Method, Objective, get, names, register

__all__ = ["Method", "Objective", "accuracy", "apply_model", "cross_entropy", "get", "names",
           "register"]
