"""Training objectives, one file per method, selected by name (`get`)."""

from mmsafe.methods import crmt  # noqa: F401  (registers "crmt", "crmt_at", ...)
from mmsafe.methods import crmt_cert  # noqa: F401  (registers "crmt_cert")
from mmsafe.methods import gb  # noqa: F401  (registers "gb")
from mmsafe.methods import jt  # noqa: F401  (registers "jt", "ojt")
from mmsafe.methods import mixup  # noqa: F401  (registers "mixup")
from mmsafe.methods import mmat  # noqa: F401  (registers "mmat")
from mmsafe.methods import msefm  # noqa: F401  (registers "msefm")
from mmsafe.methods import ogm  # noqa: F401  (registers "ogm")
from mmsafe.methods import pmr  # noqa: F401  (registers "pmr")
from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.registry import Method, Objective, get, names, register

__all__ = ["Method", "Objective", "accuracy", "apply_model", "cross_entropy", "get", "names",
           "register"]
