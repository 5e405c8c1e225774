"""Bundled demo data: MNIST-1D, generated locally by the `mnist1d` package (no network).

The files land in a landing folder and the pipeline ingests them like any other source:
`python -m lepton_tasks.demo_data --samples 5000` writes `{data_root}/landing/mnist1d/mnist1d.parquet`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lepton_tasks.config import MNIST1D, Settings
from lepton_tasks.storage import atomic_file

DEFAULT_SAMPLES = 5000  # the MNIST-1D paper's size: a 4000/1000 split at eval_fraction=0.2


def make_mnist1d(samples: int = DEFAULT_SAMPLES, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Features (samples x 40, float32) and labels (int64), from the package's own generator."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    # the generator splits train/test itself; we keep every row and let the shard stage hold out eval rows
    args.num_samples = max(samples, 10)
    args.seed = seed
    data = make_dataset(args)
    features = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
    labels = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return features[:samples], labels[:samples]


def write_mnist1d(landing_dir: Path, samples: int = DEFAULT_SAMPLES, seed: int = 42, fmt: str = "parquet") -> Path:
    """Write the demo data as one Parquet or CSV file in `landing_dir`; returns the file."""
    import pandas as pd

    features, labels = make_mnist1d(samples, seed)
    frame = pd.DataFrame(features, columns=list(MNIST1D.dataset.feature_columns))
    frame[MNIST1D.dataset.label_column] = labels
    target = Path(landing_dir) / f"mnist1d.{fmt}"
    with atomic_file(target) as tmp:
        if fmt == "csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="rows to generate")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--landing-dir", type=Path, help="default: {data_root}/landing/mnist1d")
    args = parser.parse_args(argv)
    landing = args.landing_dir or Settings.from_env().data_root / "landing" / "mnist1d"
    print(write_mnist1d(landing, args.samples, args.seed, args.format))


if __name__ == "__main__":
    main()
