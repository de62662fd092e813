"""gpart: GPart fine-tuning in pure PyTorch.

Freeze a model, flatten its target weights into one index space of size D, split it into ``d``
seeded groups, and train one vector ``theta`` of length ``d``: every target entry becomes
``W0[i] + theta[g(i)] / sqrt(n_g(i))``. The map theta -> delta is an isometry.

>>> import torch, gpart
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
>>> model = gpart.apply(model, d=32, seed=0, targets=["0"], trainable=["2"])
>>> print(gpart.summary(model))
theta: 32 | other trainable: 34 | trainable: 66 of 338 (19.5266%)
"""

from ._version import __version__
from .core import Summary, adapters, apply, cached, disabled, merge, remove, set_active, summary, theta
from .errors import ConfigError, FormatError, GPartError, LayoutError, StateError, TargetError
from .peft_format import load_peft, read_peft, save_peft
from .serialization import load, read, save

__all__ = [
    "ConfigError",
    "FormatError",
    "GPartError",
    "LayoutError",
    "StateError",
    "Summary",
    "TargetError",
    "__version__",
    "adapters",
    "apply",
    "cached",
    "disabled",
    "load",
    "load_peft",
    "merge",
    "read",
    "read_peft",
    "remove",
    "save",
    "save_peft",
    "set_active",
    "summary",
    "theta",
]
