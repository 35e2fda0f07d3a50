"""Data: the .beton reader, the DALI multi-crop loader and the release's reference pipeline.

`import mugs_fast.data.beton` stays light (numpy only); the loaders, which import DALI and torchvision/timm,
are loaded on first use of `mugs_fast.data.MultiCropLoader` / `ReferenceLoader`.
"""

import importlib

_LAZY = {
    "CropSpec": "mugs_fast.data.contract",
    "MultiCropSource": "mugs_fast.data.contract",
    "MultiCropLoader": "mugs_fast.data.loader",
    "ReferenceLoader": "mugs_fast.data.reference",
    "ReleaseAugmentation": "mugs_fast.data.reference",
    "EpochSampler": "mugs_fast.data.sampler",
    "BetonReader": "mugs_fast.data.beton",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
