"""The main job on the built-in dataset: synth -> convert train and val -> inspect, then a short summary.

    python -m mugs_fast.demo [--output_dir runs/demo] [--seed 0]      (installed as `mugs-demo`)

Each stage is one function over the run directory; later stages (training, kNN evaluation) slot in after
`inspect_betons`. Re-running replaces the run directory's data and .beton files.
"""

import argparse
import sys
import time
from pathlib import Path

from data_prep import PrepError, error_line
from data_prep.convert import ConversionSummary, convert
from data_prep.inspect_beton import beton_stats, contact_sheet, format_stats
from data_prep.synth import SynthDataset, write_dataset
from mugs_fast.data.beton import BetonError, BetonReader

SPLITS = ("train", "val")


def make_dataset(out: Path, seed: int, train_per_class: int, val_per_class: int) -> SynthDataset:
    data = write_dataset(
        out / "data", seed=seed, train_per_class=train_per_class, val_per_class=val_per_class, overwrite=True
    )
    print(f"[synth]   {data}")
    return data


def convert_splits(data: SynthDataset, out: Path) -> dict[str, ConversionSummary]:
    summaries = {}
    for split in SPLITS:
        summaries[split] = convert(data.root / split, out / f"{split}.beton", overwrite=True)
        print(f"[convert] {summaries[split]}")
    return summaries


def inspect_betons(out: Path) -> Path:
    for split in SPLITS:
        print(f"[inspect] {format_stats(beton_stats(BetonReader(out / f'{split}.beton')), max_classes_listed=0)}")
    sheet = out / "train_sheet.png"
    contact_sheet(BetonReader(out / "train.beton"), sheet)
    print(f"[inspect] contact sheet of train: {sheet}")
    return sheet


def print_summary(out: Path, summaries: dict[str, ConversionSummary], sheet: Path, seconds: float) -> None:
    rows = [f"  {split:<6} {s.dst}  {s.written:,} images, {s.bytes / 1e6:.1f} MB" for split, s in summaries.items()]
    print(f"\ndemo done in {seconds:.1f} s: {out}", *rows, f"  sheet  {sheet}", sep="\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mugs-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in dataset (default 0)")
    parser.add_argument("--train_per_class", type=int, default=300, help="train images per class (default 300)")
    parser.add_argument("--val_per_class", type=int, default=50, help="val images per class (default 50)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = args.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        data = make_dataset(out, args.seed, args.train_per_class, args.val_per_class)
        summaries = convert_splits(data, out)
        sheet = inspect_betons(out)
    except (PrepError, BetonError, OSError) as e:
        print(f"mugs-demo: error: {error_line(e)}", file=sys.stderr)
        return 1
    print_summary(out, summaries, sheet, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
