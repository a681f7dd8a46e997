"""rnnlab: watch gradients flow through time in recurrent networks.

    rnnlab.GradFlowCallback(dirpath)  # a Lightning callback for any LightningModule's RNNs
    with rnnlab.watch(model) as flow:  # the same instrument in a plain PyTorch loop
        ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["GradFlowCallback", "Watch", "tune_malloc", "watch"]

# Imported on first use, so that `import rnnlab.config` (the scripts' start-up) stays light.
_LAZY = {"GradFlowCallback": "rnnlab.callbacks", "Watch": "rnnlab.watching",
         "watch": "rnnlab.watching", "tune_malloc": "rnnlab.malloc"}

if TYPE_CHECKING:
    from rnnlab.callbacks import GradFlowCallback
    from rnnlab.malloc import tune_malloc
    from rnnlab.watching import Watch, watch


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("gradflow", "records"):  # rnnlab.gradflow.load(...) after a bare `import rnnlab`
        return importlib.import_module(f"rnnlab.{name}")
    raise AttributeError(f"module 'rnnlab' has no attribute {name!r}")
