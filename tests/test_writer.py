"""data_prep.writer.BetonWriter: a stream of unknown length (metadata outgrowing its reserved space)."""

import numpy as np
import pytest

from data_prep.writer import BetonWriter
from mugs_fast.data.beton import BetonReader

PAGE = 1 << 21  # the smallest page: 2 MiB of metadata is ~87k samples


def _blobs(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, int(rng.integers(20, 60)), dtype=np.uint8).tobytes() for _ in range(n)]


@pytest.mark.parametrize("capacity", [0, 1000])
def test_more_samples_than_reserved_move_the_first_pages(tmp_path, capacity):
    """100k samples: their metadata (2.4 MB) outgrows the space before the first data page; that page moves to
    the end and every sample still reads back, with ffcv's reader too."""
    blobs = _blobs(100_000)
    path = tmp_path / "stream.beton"
    with BetonWriter(path, capacity, PAGE) as writer:
        for i, blob in enumerate(blobs):
            writer.add(blob, 7 + i % 5, 9, i % 13)
        size = writer.finish()
    assert size == path.stat().st_size
    reader = BetonReader(path)
    assert len(reader) == len(blobs)
    assert all(reader[i][0].tobytes() == blob for i, blob in enumerate(blobs))
    assert reader.labels.tolist() == [i % 13 for i in range(len(blobs))]
    assert reader.heights.tolist() == [7 + i % 5 for i in range(len(blobs))]
    assert (reader.ptrs % PAGE + reader.sizes <= PAGE).all()  # no sample crosses a page boundary

    ffcv_reader = pytest.importorskip("ffcv.reader").Reader(str(path))
    table = ffcv_reader.alloc_table
    np.testing.assert_array_equal(table["ptr"], reader.ptrs)
    np.testing.assert_array_equal(ffcv_reader.metadata["f0"]["data_ptr"], reader.ptrs)
