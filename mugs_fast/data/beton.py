"""Read an ffcv .beton (JPEG images + integer labels) with numpy alone: no ffcv, numba or OpenCV.

File layout (ffcv format version 2, little-endian; the dtypes below are ffcv's own, see ffcv/types.py):

    header          HEADER_DTYPE: version, num_fields, page_size, num_samples, alloc_table_ptr
    field table     num_fields x FIELD_DESC_DTYPE: type id, name, 1 KiB of field arguments
    metadata        num_samples rows of the fields' metadata, one aligned struct per row
    data pages      page_size-aligned pages holding the JPEG bytes; a sample never crosses a page
    alloc table     ALLOC_DTYPE rows (sample id, file offset, size), from alloc_table_ptr to the end of the file

An RGBImageField row holds mode (0 = jpg), width, height and a data pointer but not the JPEG's length: the
length comes from the allocation table entry with that pointer.
"""

import json
import os
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
JPG_MODE = 0

HEADER_DTYPE = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
FIELD_DESC_DTYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC_DTYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])

RGB_IMAGE_DTYPE = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_PTR_SIZE_DTYPE = np.dtype([("ptr", "<u8"), ("size", "<u8")])
# ffcv's field type ids -> the metadata each field stores per sample
FIELD_TYPES = {
    0: ("float", np.dtype("<f8")),
    1: ("int", np.dtype("<i8")),
    2: ("rgb_image", RGB_IMAGE_DTYPE),
    3: ("bytes", _PTR_SIZE_DTYPE),
    4: ("ndarray", np.dtype("<u8")),
    5: ("json", _PTR_SIZE_DTYPE),
    6: ("torch_tensor", np.dtype("<u8")),
}
INT_FIELD, RGB_IMAGE_FIELD = 1, 2


class BetonError(ValueError):
    """A file that is not a readable .beton of JPEG images and labels (truncated, foreign, unsupported)."""


def metadata_dtype(type_ids: list[int]) -> np.dtype:
    """The per-sample metadata row of a .beton with these field types (ffcv's get_metadata_type)."""
    return np.dtype([(f"f{i}", FIELD_TYPES[t][1]) for i, t in enumerate(type_ids)], align=True)


def sidecar_path(beton_path: str | os.PathLike, kind: str) -> Path:
    """`DST.beton` -> `DST.beton.<kind>.json` (kind: 'classes', 'report'): from the full name, so that outputs
    whose names differ only in the suffix (`a.beton`, `a.v2`) never share a side file."""
    path = Path(beton_path)
    return path.with_name(f"{path.name}.{kind}.json")


class BetonReader:
    """Random access to the (JPEG bytes, label) samples of a .beton through a read-only memory map.

    `reader[i]` -> (jpeg, label): `jpeg` is a zero-copy, read-only uint8 view into the map (a few us), `label`
    an int. Per-sample int64 arrays, read once at open, for samplers and loaders: `labels`, `heights`,
    `widths`, `sizes` (JPEG byte lengths), `ptrs` (file offsets). `classes`: the class names from
    `DST.beton.classes.json` beside the file (None when absent); `num_classes`. A reader pickles as its path, so it
    can be sent to worker processes. Raises BetonError for a truncated, foreign or unsupported file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (ValueError, OSError) as e:  # numpy refuses to map an empty file with ValueError
            raise BetonError(f"{self.path}: cannot map file: {getattr(e, 'strerror', None) or e}") from None
        self._data = data.view(np.ndarray)  # slices of a plain ndarray view: no memmap subclass per sample
        header = self._read_header()
        fields = self._read_fields(int(header["num_fields"]))
        meta = self._read_metadata(fields, int(header["num_samples"]))
        image, label = _pick_fields(fields, self.path)
        images = meta[f"f{image}"]
        if images.size and (images["mode"] != JPG_MODE).any():
            raise BetonError(f"{self.path}: holds raw-pixel images; only 'jpg' mode is supported")

        self.page_size = int(header["page_size"])
        self.labels = meta[f"f{label}"].astype(np.int64)
        self.heights = images["height"].astype(np.int64)
        self.widths = images["width"].astype(np.int64)
        self.ptrs = images["data_ptr"].astype(np.int64)
        self.sizes = self._jpeg_sizes(int(header["alloc_table_ptr"]))
        self.classes = _read_classes(self.path)
        if self.classes is not None and len(self.labels) and self.labels.max() >= len(self.classes):
            raise BetonError(f"{self.path}: labels up to {self.labels.max()} but {len(self.classes)} classes listed")

    def _read_header(self) -> np.void:
        if self._data.size < HEADER_DTYPE.itemsize:
            raise BetonError(f"{self.path}: not a .beton file (only {self._data.size} bytes)")
        header = self._data[: HEADER_DTYPE.itemsize].view(HEADER_DTYPE)[0]
        if header["version"] != FORMAT_VERSION:
            raise BetonError(f"{self.path}: not an ffcv .beton (format version {header['version']}, expected 2)")
        if not 0 < header["alloc_table_ptr"] <= self._data.size:
            raise BetonError(f"{self.path}: truncated or unfinished .beton (allocation table past the end)")
        return header

    def _read_fields(self, num_fields: int) -> np.ndarray:
        end = HEADER_DTYPE.itemsize + num_fields * FIELD_DESC_DTYPE.itemsize
        if num_fields == 0 or end > self._data.size:
            raise BetonError(f"{self.path}: not a .beton file (bad field table)")
        fields = self._data[HEADER_DTYPE.itemsize : end].view(FIELD_DESC_DTYPE)
        unknown = sorted({int(t) for t in fields["type_id"]} - FIELD_TYPES.keys())
        if unknown:
            raise BetonError(f"{self.path}: unsupported ffcv field type ids {unknown}")
        return fields

    def _read_metadata(self, fields: np.ndarray, num_samples: int) -> np.ndarray:
        dtype = metadata_dtype([int(t) for t in fields["type_id"]])
        start = HEADER_DTYPE.itemsize + fields.nbytes
        end = start + num_samples * dtype.itemsize
        if end > self._data.size:
            raise BetonError(f"{self.path}: truncated .beton (metadata of {num_samples} samples past the end)")
        return self._data[start:end].view(dtype)

    def _jpeg_sizes(self, alloc_table_ptr: int) -> np.ndarray:
        """Each sample's JPEG length: the size of the allocation whose pointer is the sample's data pointer."""
        table_bytes = self._data[alloc_table_ptr:]
        if table_bytes.size % ALLOC_DTYPE.itemsize:
            raise BetonError(f"{self.path}: truncated .beton (allocation table cut short)")
        table = table_bytes.view(ALLOC_DTYPE)
        order = np.argsort(table["ptr"], kind="stable")
        ptrs = table["ptr"][order].astype(np.int64)
        pos = np.minimum(np.searchsorted(ptrs, self.ptrs), max(len(ptrs) - 1, 0))
        if len(self.ptrs) and (len(ptrs) == 0 or (ptrs[pos] != self.ptrs).any()):
            raise BetonError(f"{self.path}: truncated or corrupt .beton (images missing from the allocation table)")
        sizes = table["size"][order][pos].astype(np.int64)
        if len(sizes) and (self.ptrs + sizes > alloc_table_ptr).any():
            raise BetonError(f"{self.path}: corrupt .beton (image data overlaps the allocation table)")
        return sizes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self.labels)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i %= n
        ptr = self.ptrs[i]
        return self._data[ptr : ptr + self.sizes[i]], int(self.labels[i])

    @property
    def num_classes(self) -> int:
        """len(classes), or max label + 1 when the class list is absent."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def __reduce__(self):
        return (type(self), (self.path,))

    def __repr__(self) -> str:
        return f"BetonReader('{self.path}', samples={len(self)}, classes={self.num_classes})"


def _pick_fields(fields: np.ndarray, path: Path) -> tuple[int, int]:
    """Indices of the first RGB image field and the first int field."""
    type_ids = [int(t) for t in fields["type_id"]]
    if RGB_IMAGE_FIELD not in type_ids or INT_FIELD not in type_ids:
        names = [FIELD_TYPES[t][0] for t in type_ids]
        raise BetonError(f"{path}: needs an RGB image field and an int label field, has {names}")
    return type_ids.index(RGB_IMAGE_FIELD), type_ids.index(INT_FIELD)


def _read_classes(path: Path) -> list[str] | None:
    classes_path = sidecar_path(path, "classes")
    if not classes_path.exists():
        return None
    try:
        classes = json.loads(classes_path.read_text())
    except (OSError, ValueError) as e:
        raise BetonError(f"{classes_path}: unreadable class list ({e})") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise BetonError(f"{classes_path}: expected a JSON list of class names")
    return classes


def open_beton(path: str | os.PathLike) -> BetonReader:
    """The reader of the .beton at `path`: FileNotFoundError (naming it) when no file is there, BetonError when the
    file is not a readable .beton."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no .beton file at {path}")
    return BetonReader(path)
