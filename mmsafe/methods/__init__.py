"""Training methods selected by name (`get`): one file per method or family.

`compose.py` declares the methods that are an input transform x a loss x a
head (jt, ojt, mmat, decoupling_at, mixup and the CRMT variants); the certificate-trained
`crmt_cert`, `jt_cert` and `ojt_cert` (`crmt_cert.py`), `gb`, `ogm`, `pmr` and
`msefm` have objectives of their own. Every method's hyper-parameters are a
frozen dataclass (`settings.Settings`, `Method.settings`) that
`config.method_kwargs` overrides (`Method.make_settings`).
"""

from mmsafe.methods import compose  # noqa: F401  (registers jt, ojt, mmat, mixup, crmt, ...)
from mmsafe.methods import crmt_cert  # noqa: F401  (registers crmt_cert, jt_cert, ojt_cert)
from mmsafe.methods import gb  # noqa: F401  (registers "gb")
from mmsafe.methods import msefm  # noqa: F401  (registers "msefm")
from mmsafe.methods import ogm  # noqa: F401  (registers "ogm")
from mmsafe.methods import pmr  # noqa: F401  (registers "pmr")
from mmsafe.methods import randomized  # noqa: F401  (registers "gaussian_aug", "ablated")
from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.registry import (Callback, CallbackContext, Method, Objective, Stage,
                                     add_method, get, names, register, setting_owners,
                                     settings_of)
from mmsafe.methods.settings import Settings, setting

__all__ = ["Callback", "CallbackContext", "Method", "Objective", "Settings", "Stage", "accuracy",
           "add_method", "apply_model", "cross_entropy", "get", "names", "register", "setting",
           "setting_owners", "settings_of"]
