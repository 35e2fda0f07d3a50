"""`python -m mugs_fast.data.preview FILE.beton --out crops.png`: every crop of a few images, for the eye.

One row per image: its 2 teacher crops, 2 student global crops and the local crops, each labelled
teacher / student-weak / student-strong (un-normalised; random-erasing noise shows as noise).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mugs_fast.data.beton import BetonError
from mugs_fast.data.contract import CropSpec
from mugs_fast.data.finish import IMAGENET_MEAN, IMAGENET_STD

LABEL_HEIGHT, GAP = 14, 4


def crop_images(batch: dict, image: int) -> list[tuple[np.ndarray, str]]:
    """(HWC uint8 crop, label) for all crops of one image of a loader batch."""
    b = len(batch["label"])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    to_uint8 = lambda x: (x.float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    student = "student-weak" if batch["weak"][image] else "student-strong"
    crops = [(to_uint8(batch["teacher"][k * b + image]), "teacher") for k in range(2)]
    crops += [(to_uint8(batch["student_global"][k * b + image]), student) for k in range(2)]
    local = batch["student_local"]
    for k in range(local.shape[0] // b):
        row = k * b + image
        crops.append((to_uint8(local[row]), "student-strong" if batch["strong_local"][row] else "student-weak"))
    return crops


def render_grid(batch: dict, images: int) -> Image.Image:
    """One row per image, crops side by side at their own size, each under its label."""
    rows = [crop_images(batch, i) for i in range(images)]
    widths = [max(c.shape[1], 6 * len(label)) for c, label in rows[0]]  # the default font: ~6 px per char
    height = max(c.shape[0] for c, _ in rows[0]) + LABEL_HEIGHT + GAP
    grid = Image.new("RGB", (sum(widths) + GAP * (len(widths) + 1), images * height + GAP), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        x, y = GAP, GAP + r * height
        for (crop, label), width in zip(row, widths, strict=True):
            draw.text((x, y), label, fill="black")
            grid.paste(Image.fromarray(crop), (x, y + LABEL_HEIGHT))
            x += width + GAP
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mugs_fast.data.preview", description=__doc__.splitlines()[0])
    p.add_argument("beton", type=Path, help=".beton file written by data_prep")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--images", type=int, default=4, help="number of images (rows), default 4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-crops-number", type=int, default=10)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument(
        "--pipeline",
        choices=("dali", "reference"),
        default="dali",
        help="the DALI loader or the release's PIL pipeline",
    )
    p.add_argument(
        "--device", default=None, help="cuda or cpu (default: dali on cuda when available, reference on cpu)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Writes the grid. Exit status: 0 done, 1 error (one line on stderr), 2 usage (argparse)."""
    args = build_parser().parse_args(argv)
    try:
        if args.images < 1:
            raise ValueError(f"--images must be >= 1, got {args.images}")
        if not args.out.parent.is_dir():
            raise FileNotFoundError(f"no folder {args.out.parent} for --out")
        kwargs = dict(
            crops=CropSpec(args.local_crops_number, args.global_size, args.local_size),
            device=args.device or "cpu",
            seed=args.seed,
            dtype=torch.float32,
        )
        if args.pipeline == "dali":
            from mugs_fast.data.loader import MultiCropLoader

            kwargs["device"] = args.device
            loader = MultiCropLoader(args.beton, args.images, **kwargs)
        else:
            from mugs_fast.data.reference import ReferenceLoader

            loader = ReferenceLoader(args.beton, args.images, num_workers=0, **kwargs)
        batch = next(iter(loader))
        render_grid(batch, args.images).save(args.out)
    except (OSError, ValueError, BetonError) as e:  # missing/foreign/truncated file, too few images
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {args.images} images x {4 + args.local_crops_number} crops ({args.pipeline})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
