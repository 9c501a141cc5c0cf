"""Time 3D mesh figures on a full-size synthetic label map: ``plot_meshes`` plus the HTML write.

Builds a 512 x 512 x 600 ``(Z, Y, X)`` label map with two kidney-like ellipsoids and a tumour,
a prediction that differs slightly, and prints seconds and megabytes of the resulting HTML.

    python scripts/benchmark_meshes.py [--out meshes.html] [--layout side_by_side|toggle]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.figures.meshes import LAYOUTS, plot_meshes  # noqa: E402

SHAPE = (600, 512, 512)
SPACING = (1.0, 0.78, 0.78)


def build_benchmark_labels(shift_voxels: int = 0) -> np.ndarray:
    """Two ellipsoidal kidneys (label 1), a spherical tumour (label 2) on the left one; uint8 (Z, Y, X)."""
    labels = np.zeros(SHAPE, np.uint8)
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    for centre_x in (170 + shift_voxels, 342 + shift_voxels):
        kidney = ((z - 300) / 55.0) ** 2 + ((y - 280) / 45.0) ** 2 + ((x - centre_x) / 32.0) ** 2 <= 1
        labels[kidney] = 1
    tumour = ((z - 330) / 22.0) ** 2 + ((y - 250) / 22.0) ** 2 + ((x - 150 - shift_voxels) / 22.0) ** 2 <= 1
    labels[tumour] = 2
    return labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="HTML path (default: a temporary file)")
    parser.add_argument("--layout", choices=LAYOUTS, default="side_by_side")
    args = parser.parse_args(argv)
    truth, prediction = build_benchmark_labels(), build_benchmark_labels(shift_voxels=4)
    with tempfile.TemporaryDirectory() as folder:
        path = args.out or Path(folder) / "meshes.html"
        start = time.perf_counter()
        figure = plot_meshes(truth, prediction, SPACING, layout=args.layout, path=path, title="benchmark")
        seconds = time.perf_counter() - start
        faces = [len(trace.i) for trace in figure.data]
        print(f"shape {SHAPE}, layout {args.layout}: {seconds:.2f} s, {path.stat().st_size / 1e6:.2f} MB, "
              f"faces per mesh {faces}")


if __name__ == "__main__":
    main()
