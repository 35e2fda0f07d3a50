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
# the writer holds one page in memory (ffcv's loaders one per sample in flight): 8192 px -> 1 GiB pages
MAX_RESOLUTION = 8192


def page_size_for(max_resolution: int) -> int:
    """A power-of-two page (ffcv's rule) that holds any JPEG of a max_resolution-px image: >= 4x raw RGB."""
    if not 1 <= max_resolution <= MAX_RESOLUTION:
        raise ValueError(f"max resolution must be in 1..{MAX_RESOLUTION}, got {max_resolution}")
    needed = 4 * 3 * max_resolution * max_resolution
    return max(DEFAULT_PAGE_SIZE, 1 << (needed - 1).bit_length())


class BetonWriter:
    """Appends (jpeg, height, width, label) samples to a new .beton; `finish()` makes the file valid.

    capacity: the number of samples expected, which places the first data page after their metadata table.
    More is fine (a stream of unknown length): `finish()` then moves the first data pages to the end of the file
    to make room for the table, so the layout depends only on the samples and `capacity` (0: none reserved).
    Samples never cross a page boundary, as ffcv's loaders assume; a page's unused tail reads as zeros.
    Use as a context manager: leaving the block closes the file, finished or not.
    """

    def __init__(self, path: str | os.PathLike, capacity: int = 0, page_size: int = DEFAULT_PAGE_SIZE):
        if page_size & (page_size - 1) or page_size < 1 << 21:
            raise ValueError(f"page_size must be a power of two >= 2 MiB, got {page_size}")
        self.page_size = page_size
        self.meta = np.zeros(max(capacity, 1024), metadata_dtype(list(FIELDS.values())))
        self.alloc = np.zeros(len(self.meta), ALLOC_DTYPE)
        self.count = 0
        self._file = open(path, "xb+")  # never clobbers: the caller picks a fresh (temporary) name

        self._meta_start = HEADER_DTYPE.itemsize + len(FIELDS) * FIELD_DESC_DTYPE.itemsize
        meta_end = self._meta_start + capacity * self.meta.dtype.itemsize
        self._data_start = -(-meta_end // page_size) * page_size  # first page boundary after the metadata
        self._page = bytearray(page_size)
        self._pages_written = 0  # also the index of the open page
        self._page_used = 0
        self._page_open = False

    def add(self, jpeg: bytes, height: int, width: int, label: int) -> None:
        n = len(jpeg)
        if n > self.page_size:
            raise ValueError(f"a {n}-byte JPEG does not fit a {self.page_size}-byte page")
        if self.count == len(self.meta):  # grow the tables (amortised doubling)
            self.meta = np.resize(self.meta, 2 * len(self.meta))
            self.alloc = np.resize(self.alloc, len(self.meta))
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
        # only the used part: the rest of the page is a hole the file system reads as zeros (as ffcv pads it),
        # and the page buffer needs no clearing
        self._file.seek(self._data_start + self._pages_written * self.page_size)
        self._file.write(memoryview(self._page)[: self._page_used])
        self._pages_written += 1
        self._page_used = 0

    def finish(self) -> int:
        """Writes the last page, the metadata, the allocation table and the header. Returns the file size."""
        alloc_table_ptr = self._meta_start  # no samples: nothing after the (empty) metadata
        if self._page_open:
            self._write_page()
            self._make_room_for_metadata()
            alloc_table_ptr = self._data_start + self._pages_written * self.page_size
        meta, alloc = self.meta[: self.count], self.alloc[: self.count]
        self._file.seek(alloc_table_ptr)
        self._file.write(alloc.tobytes())
        size = self._file.tell()

        header = np.zeros(1, HEADER_DTYPE)
        header[0] = (FORMAT_VERSION, len(FIELDS), self.page_size, self.count, alloc_table_ptr)
        fields = np.zeros(len(FIELDS), FIELD_DESC_DTYPE)
        for i, (name, type_id) in enumerate(FIELDS.items()):
            fields[i]["type_id"] = type_id
            fields[i]["name"][: len(name)] = np.frombuffer(name.encode("ascii"), np.uint8)
        self._file.seek(0)
        self._file.write(header.tobytes() + fields.tobytes() + meta.tobytes())
        self._file.flush()
        os.fsync(self._file.fileno())
        return size

    def _make_room_for_metadata(self) -> None:
        """Moves the first data pages behind the last one when the metadata table has outgrown the space before
        them (more samples than `capacity`); the pointers of their samples move with them."""
        meta_end = self._meta_start + self.count * self.meta.dtype.itemsize
        needed = -(-(meta_end - self._data_start) // self.page_size)  # pages the table reaches into
        if needed <= 0:
            return
        moved = min(needed, self._pages_written)
        shift_pages = max(needed, self._pages_written)  # page i -> page shift_pages + i, clear of the table
        shift = shift_pages * self.page_size
        for i in range(moved):
            self._file.seek(self._data_start + i * self.page_size)
            page = self._file.read(self.page_size)
            self._file.seek(self._data_start + i * self.page_size + shift)
            self._file.write(page)
        ptrs = self.alloc["ptr"][: self.count]
        on_moved = ptrs < self._data_start + moved * self.page_size
        ptrs[on_moved] += shift
        self.meta["f0"]["data_ptr"][: self.count] = ptrs
        self._pages_written = shift_pages + moved

    def __enter__(self) -> "BetonWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
