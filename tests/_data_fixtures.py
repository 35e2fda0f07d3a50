"""Session fixtures of the data-pipeline tests, as a pytest plugin: `pytest_plugins = ["_data_fixtures"]`."""

from pathlib import Path

import pytest
from _fixtures import LOADER_ARGS, write_beton


@pytest.fixture(scope="session")
def small_beton(tmp_path_factory) -> Path:
    """96 synthetic images of 40-72 px, 5 classes."""
    return write_beton(tmp_path_factory.mktemp("data") / "small.beton", 96)


@pytest.fixture(scope="session")
def dali_loader(small_beton):
    """The DALI loader (CPU mode) on small_beton: batch 12, 10 local crops, 32/16-px crops, seed 7."""
    from mugs_fast.data import MultiCropLoader

    return MultiCropLoader(small_beton, 12, **LOADER_ARGS)
