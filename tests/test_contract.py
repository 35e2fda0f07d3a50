"""mugs_fast.data.contract and .replacement: the crop spec, the protocol every loader meets, the replacement log."""

import warnings

import pytest
from _fixtures import LOADER_ARGS

from mugs_fast.config import recipe
from mugs_fast.data.contract import MUGS_CROPS, CropSpec, MultiCropSource
from mugs_fast.data.reference import ReferenceLoader
from mugs_fast.data.replacement import Replacements
from mugs_fast.data.synthetic import SyntheticLoader

pytest_plugins = ["_data_fixtures"]  # small_beton, dali_loader


def test_crop_spec_defaults_are_the_papers_and_follow_the_config():
    assert (MUGS_CROPS.local_crops_number, MUGS_CROPS.global_size, MUGS_CROPS.local_size) == (10, 224, 96)
    assert MUGS_CROPS.crops_per_image == 14
    cfg = recipe("tiny", local_crops_number=3, global_crop_size=48, size_crops=(16,))
    assert CropSpec.from_config(cfg) == CropSpec(3, 48, 16)


@pytest.mark.parametrize(
    "fields, name",
    [((-1, 32, 16), "local_crops_number"), ((2, 0, 16), "global_size"), ((2, 32, -3), "local_size")],
)
def test_crop_spec_refuses_bad_values(fields, name):
    with pytest.raises(ValueError, match=f"{name} must be >= "):
        CropSpec(*fields)


def test_every_loader_is_a_multi_crop_source(dali_loader, small_beton):
    synthetic = SyntheticLoader(5, crops=CropSpec(1, 16, 8), epoch_images=20)
    reference = ReferenceLoader(small_beton, 12, num_workers=0, **LOADER_ARGS)
    for loader in (dali_loader, reference, synthetic):
        assert isinstance(loader, MultiCropSource), type(loader).__name__
    assert synthetic.num_replaced == 0
    assert not isinstance(object(), MultiCropSource)


def test_replacements_name_each_sample_once_and_load_saved_keys():
    log = Replacements("x.beton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert log.mark(4, "bad huffman table") and not log.mark(4, "bad huffman table")
    assert [str(w.message) for w in caught] == [
        "x.beton: sample 4 does not decode (bad huffman table); it is replaced by another sample (1 undecodable so far)"
    ]
    log.load({"9": "not a jpeg"})  # keys of a state saved as JSON
    assert log.corrupt == {4: "bad huffman table", 9: "not a jpeg"}
    assert "replace sample 9 (2 undecodable so far)" in str(log.not_found(9))
