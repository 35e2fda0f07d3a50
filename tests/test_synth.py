"""data_prep.synth: deterministic image folders whose classes colour alone does not tell apart."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prep_testing import assert_one_line_error, run_prep

from data_prep import PrepError
from data_prep.synth import PATTERNS, render, write_dataset


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    kwargs = dict(num_classes=3, train_per_class=4, val_per_class=2, min_size=40, max_size=72)
    a = write_dataset(tmp_path / "a", seed=5, workers=1, **kwargs)
    write_dataset(tmp_path / "b", seed=5, workers=2, **kwargs)
    write_dataset(tmp_path / "c", seed=6, workers=2, **kwargs)
    assert len(digest(a.root)) == 18
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    other = digest(tmp_path / "c")
    assert other.keys() == digest(a.root).keys() and not set(other.values()) & set(digest(a.root).values())


def test_layout_and_sizes(tmp_path):
    data = write_dataset(tmp_path, num_classes=4, train_per_class=5, val_per_class=3, min_size=50, max_size=70)
    assert data.classes == ["00_stripes", "01_checkers", "02_dots", "03_rings"]
    assert (data.num_train, data.num_val) == (20, 12)
    for split, per_class in (("train", 5), ("val", 3)):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == data.classes
        for name in data.classes:
            files = sorted((tmp_path / split / name).iterdir())
            assert len(files) == per_class
            for f in files:
                img = Image.open(f)
                assert img.format == "JPEG" and img.mode == "RGB"
                assert 50 <= img.width <= 70 and 50 <= img.height <= 70


def test_mean_colour_does_not_tell_the_classes_apart(tmp_path):
    """A nearest-class-mean classifier on each image's mean RGB stays near chance (10 %) on val."""
    data = write_dataset(tmp_path, train_per_class=40, val_per_class=20, min_size=64, max_size=96)

    def mean_rgb(split: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = [], []
        for label, name in enumerate(data.classes):
            for path in sorted((tmp_path / split / name).iterdir()):
                x.append(np.asarray(Image.open(path), dtype=np.float64).reshape(-1, 3).mean(0))
                y.append(label)
        return np.array(x), np.array(y)

    x_train, y_train = mean_rgb("train")
    x_val, y_val = mean_rgb("val")
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(len(PATTERNS))])  # (10, 3)
    pred = np.argmin(((x_val[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == y_val).mean()
    assert accuracy < 0.2, accuracy  # chance is 0.1; a colour-coded class would score near 1


def test_every_image_shows_its_pattern():
    """No near-blank image: the luma of every image spreads widely (the pattern's dark and light fields)."""
    for label in range(len(PATTERNS)):
        for i in range(6):
            img = render(np.random.default_rng([7, label, i]), label, 61, 97)
            luma = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # (H, W)
            assert np.percentile(luma, 90) - np.percentile(luma, 10) > 60, (label, i)


def test_existing_split_is_kept_unless_overwrite(tmp_path):
    write_dataset(tmp_path, num_classes=1, train_per_class=1, val_per_class=1, min_size=32, max_size=32)
    marker = tmp_path / "train" / "keep.txt"
    marker.write_text("mine")
    with pytest.raises(PrepError, match="exists"):
        write_dataset(tmp_path, num_classes=1, train_per_class=1, val_per_class=1)
    assert marker.exists()
    write_dataset(tmp_path, num_classes=1, train_per_class=2, val_per_class=1, min_size=32, max_size=32, overwrite=True)
    assert not marker.exists() and len(list((tmp_path / "train").rglob("*.jpg"))) == 2


def test_cli(tmp_path):
    args = ["--num-classes", "2", "--train-per-class", "3", "--val-per-class", "1", "--min-size", "32"]
    proc = run_prep("synth", str(tmp_path), *args)
    assert proc.returncode == 0 and "wrote 6 train and 2 val images of 2 classes" in proc.stdout, proc.stderr
    assert_one_line_error(run_prep("synth", str(tmp_path), *args), "exists", "--overwrite")  # again
    assert_one_line_error(run_prep("synth", str(tmp_path), *args, "--num-classes", "11"), "must be 1..10", status=2)


def test_patterns_stand_near_upright_unless_asked():
    """The stripes' orientation (the luma gradient's dominant direction) follows max_tilt: vertical at 0, within
    a few degrees of the bound at 20 (the shape's edges pull a little), anywhere at 180."""

    def stripe_angle(img: np.ndarray) -> float:  # degrees from vertical stripes (horizontal gradients)
        gy, gx = np.gradient(img.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
        return abs(np.degrees(0.5 * np.arctan2(2 * (gx * gy).sum(), (gx * gx).sum() - (gy * gy).sum())))

    def angles(max_tilt: float) -> list[float]:
        return [stripe_angle(render(np.random.default_rng([1, i]), 0, 96, 96, max_tilt)) for i in range(12)]

    assert max(angles(0)) < 2 and max(angles(20)) < 26 and max(angles(180)) > 45


def test_bad_tilt_is_refused(tmp_path):
    with pytest.raises(PrepError, match="max_tilt"):
        write_dataset(tmp_path, num_classes=1, train_per_class=1, val_per_class=0, max_tilt=181)
    assert_one_line_error(run_prep("synth", str(tmp_path), "--max-tilt", "-1"), "must be 0..180", status=2)
