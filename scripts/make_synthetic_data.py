"""Write a synthetic KiTS19- or KiTS23-style dataset (procedural, or CT synthesised around real masks).

Examples:
    python scripts/make_synthetic_data.py --out data/synthetic --cases 20 --workers 2
    python scripts/make_synthetic_data.py --out data/from_masks --from-masks ../kits19/data --cases 5
    python scripts/make_synthetic_data.py --out data/test --from-masks ../kits19/data --case-ids case_00150,case_00151
    python scripts/make_synthetic_data.py --out data/synthetic23 --cases 20 --dataset kits23
    python scripts/make_synthetic_data.py --out data/from_kits23 --from-masks ../kits23/dataset --dataset kits23
    python scripts/make_synthetic_data.py --out data/k23 --from-masks ../kits23 --dataset kits23 --labels-as kits19

With --dataset kits23 the cases hold KiTS23's labels (3: simple renal cysts, water density) and the
folder gets kits23.json instead of kits.json. KiTS23 masks need --dataset kits23 (they are refused
otherwise, before any case is written); KiTS19 masks may be read as kits23 too (no cysts then).
--labels-as kits19 writes KiTS23 masks as KiTS19 cases: the cysts stay in the CT, labelled kidney
(as KiTS19's annotators labelled them), with kits.json: extra training cases for a KiTS19 model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from utils.data.dataset_definitions import DATASETS, get_dataset
from utils.synthetic.dataset import SyntheticOptions, generate_dataset, generate_from_masks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (KiTS19 layout; kits23.json with --dataset kits23)")
    parser.add_argument("--cases", type=int, default=None,
                        help="number of cases (required unless --from-masks; there: first N masks, default all)")
    parser.add_argument("--seed", type=int, default=0, help="master seed; case i depends only on (seed, i)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), default=None,
                        help="fixed voxel size in mm (default: drawn from KiTS19's ranges)")
    parser.add_argument("--matrix", type=int, default=512, help="in-plane size in voxels (default 512)")
    parser.add_argument("--from-masks", default=None, metavar="DIR",
                        help="folder of real segmentations (case_XXXXX/segmentation.nii.gz) to synthesise CT "
                             "around: KiTS19's, or KiTS23's with --dataset kits23")
    parser.add_argument("--case-ids", default=None, metavar="IDS",
                        help="with --from-masks: comma-separated case ids to take, e.g. case_00150,case_00151")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--dataset", choices=list(DATASETS), default="kits19",
                        help="labels and metadata file to write: kits19 (0-2, kits.json; default) or kits23 "
                             "(3 = cyst, kits23.json); with --from-masks, whose masks these are")
    parser.add_argument("--labels-as", choices=list(DATASETS), default=None,
                        help="with --from-masks: write the cases as this dataset's (labels, metadata file); "
                             "kits19 for KiTS23 masks labels their cysts kidney (default: --dataset)")
    args = parser.parse_args(argv)
    if args.case_ids is not None:
        args.case_ids = [case_id.strip() for case_id in args.case_ids.split(",") if case_id.strip()]
        if args.from_masks is None:
            parser.error("--case-ids selects masks: it needs --from-masks")
        if args.cases is not None:
            parser.error("give --cases (the first N masks) or --case-ids (those masks), not both")
        if not args.case_ids:
            parser.error("--case-ids needs at least one case id, e.g. --case-ids case_00150,case_00151")
    if args.labels_as is not None and args.from_masks is None:
        parser.error("--labels-as rewrites real masks: it needs --from-masks")
    if args.from_masks is None and args.cases is None:
        parser.error("--cases is required for procedural generation")
    if args.from_masks is not None and (args.spacing is not None or args.matrix != 512):
        parser.error("--spacing and --matrix apply to procedural cases only; --from-masks keeps each mask's grid")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        if args.from_masks is not None:
            summaries = generate_from_masks(args.from_masks, args.out, cases=args.cases, case_ids=args.case_ids,
                                            seed=args.seed, workers=args.workers, dataset=args.dataset,
                                            labels_as=args.labels_as)
        else:
            options = SyntheticOptions(matrix=args.matrix, spacing=tuple(args.spacing) if args.spacing else None,
                                       dataset=args.dataset)
            summaries = generate_dataset(args.out, args.cases, seed=args.seed, options=options, workers=args.workers)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dataset = get_dataset(args.labels_as or args.dataset)
    with_cysts = dataset.has_label("cyst")
    print(f"{'case':<12} {'shape (Z,Y,X)':<18} {'spacing mm (Z,Y,X)':<22} {'kidney ml':>10} {'tumour ml':>10}"
          + (f" {'cyst ml':>10}" if with_cysts else ""))
    for s in summaries:
        spacing = " x ".join(f"{v:.2f}" for v in s.spacing)
        print(f"{s.case_id:<12} {str(s.shape):<18} {spacing:<22} {s.kidney_ml:>10.1f} {s.tumour_ml:>10.1f}"
              + (f" {s.cyst_ml:>10.1f}" if with_cysts else ""))
    cyst_cases = sum(bool(s.cyst_ml) for s in summaries)
    print(f"wrote {len(summaries)} cases to {args.out} in {time.perf_counter() - start:.1f} s"
          + (f" ({dataset.title}, {dataset.metadata_name}; {cyst_cases} with a cyst, label {dataset.label('cyst')})"
             if with_cysts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
