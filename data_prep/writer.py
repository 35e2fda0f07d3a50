"""Write a .beton of JPEG images and labels sample by sample, in the layout of ffcv's DatasetWriter.

The file holds the fields {'image': RGBImageField in 'jpg' mode, 'label': IntField}: ffcv's Reader and
Loader and `mugs_fast.data.beton.BetonReader` read it. Unlike ffcv's writer (worker processes that each
fill pages of the file), one process writes the samples in the order given, so the file is deterministic and
the caller decides which images get in at all; the JPEG encoding happens wherever the caller likes.
"""

import os

import numpy as np

from mugs_fast.data.beton import (
    ALLOC_DTYPE,
    FIELD_DESC_DTYPE,
    FORMAT_VERSION,
    HEADER_DTYPE,
    INT_FIELD,
    JPG_MODE,
    RGB_IMAGE_FIELD,
    metadata_dtype,
)

DEFAULT_PAGE_SIZE = 1 << 23  # 8 MiB, ffcv's default
FIELDS = {"image": RGB_IMAGE_FIELD, "label": INT_FIELD}


def page_size_for(max_resolution: int) -> int:
    """A power-of-two page (ffcv's rule) that holds any JPEG of a max_resolution-px image: >= 4x raw RGB."""
    needed = 4 * 3 * max_resolution * max_resolution
    return max(DEFAULT_PAGE_SIZE, 1 << (needed - 1).bit_length())


class BetonWriter:
    """Appends (jpeg, height, width, label) samples to a new .beton; `finish()` makes the file valid.

    capacity: the most samples that will be added (reserves the metadata table; fewer is fine).
    Samples never cross a page boundary, as ffcv's loaders assume; every page is written in full.
    Use as a context manager: leaving the block closes the file, finished or not.
    """

    def __init__(self, path: str | os.PathLike, capacity: int, page_size: int = DEFAULT_PAGE_SIZE):
        if page_size & (page_size - 1) or page_size < 1 << 21:
            raise ValueError(f"page_size must be a power of two >= 2 MiB, got {page_size}")
        self.page_size = page_size
        self.meta = np.zeros(capacity, metadata_dtype(list(FIELDS.values())))
        self.alloc = np.zeros(capacity, ALLOC_DTYPE)
        self.count = 0
        self._file = open(path, "xb")  # never clobbers: the caller picks a fresh (temporary) name

        self._meta_start = HEADER_DTYPE.itemsize + len(FIELDS) * FIELD_DESC_DTYPE.itemsize
        meta_end = self._meta_start + self.meta.nbytes
        self._data_start = -(-meta_end // page_size) * page_size  # first page boundary after the metadata
        self._page = bytearray(page_size)
        self._pages_written = 0  # also the index of the open page
        self._page_used = 0
        self._page_open = False

    def add(self, jpeg: bytes, height: int, width: int, label: int) -> None:
        n = len(jpeg)
        if n > self.page_size:
            raise ValueError(f"a {n}-byte JPEG does not fit a {self.page_size}-byte page")
        if self.count == len(self.meta):
            raise ValueError(f"capacity of {len(self.meta)} samples exceeded")
        if not self._page_open or self._page_used + n > self.page_size:
            if self._page_open:
                self._write_page()
            self._page_open = True
        ptr = self._data_start + self._pages_written * self.page_size + self._page_used
        self._page[self._page_used : self._page_used + n] = jpeg
        self._page_used += n

        row = self.meta[self.count]
        row["f0"] = (JPG_MODE, width, height, ptr)
        row["f1"] = label
        self.alloc[self.count] = (self.count, ptr, n)
        self.count += 1

    @property
    def labels(self) -> np.ndarray:
        """The labels of the samples added so far."""
        return self.meta["f1"][: self.count]

    def _write_page(self) -> None:
        self._file.seek(self._data_start + self._pages_written * self.page_size)
        self._file.write(self._page)
        self._pages_written += 1
        self._page[:] = bytes(self.page_size)
        self._page_used = 0

    def finish(self) -> int:
        """Writes the last page, the metadata, the allocation table and the header. Returns the file size."""
        alloc_table_ptr = self._meta_start  # no samples: nothing after the (empty) metadata
        if self._page_open:
            self._write_page()
            alloc_table_ptr = self._data_start + self._pages_written * self.page_size
        self._file.seek(alloc_table_ptr)
        self._file.write(self.alloc[: self.count].tobytes())
        size = self._file.tell()

        header = np.zeros(1, HEADER_DTYPE)
        header[0] = (FORMAT_VERSION, len(FIELDS), self.page_size, self.count, alloc_table_ptr)
        fields = np.zeros(len(FIELDS), FIELD_DESC_DTYPE)
        for i, (name, type_id) in enumerate(FIELDS.items()):
            fields[i]["type_id"] = type_id
            fields[i]["name"][: len(name)] = np.frombuffer(name.encode("ascii"), np.uint8)
        self._file.seek(0)
        self._file.write(header.tobytes() + fields.tobytes() + self.meta[: self.count].tobytes())
        self._file.flush()
        os.fsync(self._file.fileno())
        return size

    def __enter__(self) -> "BetonWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
