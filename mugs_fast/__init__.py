"""mugs-fast: Mugs self-supervised pretraining of vision transformers, fast."""

__version__ = "0.1.0"
