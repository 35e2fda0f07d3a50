"""Labels of a flat image collection (ImageNet's val): image name -> class name, from the files users have.

- the devkit, `ILSVRC2012_devkit_t12.tar.gz`: `data/ILSVRC2012_validation_ground_truth.txt` holds one
  ILSVRC2012_ID per val image (line i: `ILSVRC2012_val_0000000i.JPEG`), `data/meta.mat` maps the ids to WordNet
  ids (synsets), as torchvision's `parse_devkit_archive` reads them (with scipy, needed for this form only);
- Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`, the synset first in each prediction string;
- a plain text file of `filename synset` lines (whitespace or a comma between them; `#` starts a comment).

Names are matched without their extension (`ILSVRC2012_val_00000001` and `...00000001.JPEG` are one image).
"""

import csv
import io
import json
import tarfile
from pathlib import Path, PurePosixPath

from data_prep import PrepError
from mugs_fast.data.beton import sidecar_path

DEVKIT_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"
KAGGLE_HEADER = ["ImageId", "PredictionString"]


class LabelsError(PrepError):
    """A labels or class-list file that cannot be read: its message names the file (and the line)."""


def image_key(name: str) -> str:
    """How an image is looked up in a labels file: its file name without folders and extension."""
    return PurePosixPath(name).stem


def read_labels(path: str | Path) -> dict[str, str]:
    """{image key: synset} from a devkit archive, a Kaggle CSV or a `filename synset` file (see the module)."""
    path = Path(path)
    try:
        if tarfile.is_tarfile(path):
            return _devkit_labels(path)
        text = path.read_text()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise LabelsError(f"cannot read labels {path}: {getattr(e, 'strerror', None) or e}") from None
    except UnicodeDecodeError:
        raise LabelsError(f"labels {path}: neither a devkit archive nor a text file") from None
    if text.startswith(",".join(KAGGLE_HEADER)):
        return _kaggle_labels(path, text)
    return _plain_labels(path, text)


def _add(labels: dict[str, str], name: str, synset: str, where: str) -> None:
    key = image_key(name)
    if labels.setdefault(key, synset) != synset:
        raise LabelsError(f"{where}: {name} is labelled both {labels[key]} and {synset}")


def _plain_labels(path: Path, text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        if len(fields) != 2:
            raise LabelsError(f"labels {path} line {number}: expected 'filename synset', got {line.strip()!r}")
        _add(labels, fields[0], fields[1], f"labels {path} line {number}")
    if not labels:
        raise LabelsError(f"labels {path}: no 'filename synset' lines")
    return labels


def _kaggle_labels(path: Path, text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    rows = csv.reader(io.StringIO(text))
    next(rows)
    for number, row in enumerate(rows, 2):
        if len(row) != 2 or not row[1].split():
            raise LabelsError(f"labels {path} line {number}: expected 'ImageId,synset x y x y ...', got {row}")
        _add(labels, row[0], row[1].split()[0], f"labels {path} line {number}")
    return labels


def _devkit_labels(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        found = {}
        for wanted in (DEVKIT_GROUND_TRUTH, DEVKIT_META):
            name = next((n for n in members if n == wanted or n.endswith("/" + wanted)), None)
            if name is None:
                raise LabelsError(f"labels {path}: an archive without {wanted}, so not the ILSVRC2012 devkit")
            found[wanted] = tar.extractfile(members[name]).read()
    id_to_synset = _devkit_synsets(path, found[DEVKIT_META])
    labels = {}
    for number, line in enumerate(found[DEVKIT_GROUND_TRUTH].decode().split(), 1):
        if not line.isdigit() or int(line) not in id_to_synset:
            raise LabelsError(f"labels {path}: {DEVKIT_GROUND_TRUTH} line {number}: no ILSVRC2012_ID {line!r}")
        labels[f"ILSVRC2012_val_{number:08d}"] = id_to_synset[int(line)]
    return labels


def _devkit_synsets(path: Path, meta_mat: bytes) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the leaf synsets (the 1,000 classes) in meta.mat, as torchvision reads them."""
    try:
        from scipy.io import loadmat  # only this form of labels needs scipy: imported here, not at start-up
    except ImportError:
        raise LabelsError(
            f"reading {DEVKIT_META} of {path} needs scipy (pip install scipy), or give LOC_val_solution.csv "
            "or a 'filename synset' file as --labels"
        ) from None
    try:
        synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
        ids, wnids, children = synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"]
    except Exception as e:  # scipy raises ValueError, TypeError, KeyError, ... for a file it cannot parse
        raise LabelsError(f"labels {path}: unreadable {DEVKIT_META} ({type(e).__name__}: {e})") from None
    return {int(i): str(w) for i, w, c in zip(ids, wnids, children, strict=True) if int(c) == 0}


def read_class_list(path: str | Path) -> list[str]:
    """The class names of a conversion: a JSON list such as `train.beton.classes.json`, or the .beton itself."""
    path = Path(path)
    if path.suffix != ".json":
        path = sidecar_path(path, "classes")
    try:
        classes = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LabelsError(f"cannot read the class list {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise LabelsError(f"class list {path}: expected a JSON list of class names")
    if len(set(classes)) != len(classes):
        raise LabelsError(f"class list {path}: a class is listed twice")
    return classes
