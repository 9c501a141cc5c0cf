"""Settings of the end-to-end demo (``configs/demo.yaml``, ``configs/demo_cv.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.config.data import (
    AugmentationConfig,
    PatchDatasetConfig,
    PreprocessingConfig,
    SliceDatasetConfig,
    SplitConfig,
    SyntheticDataConfig,
)
from utils.config.experiment import DATASET_LABEL_COUNTS


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the end-to-end demo (``make demo``).

    Attributes:
        split: the split of the demo's cases. ``scheme: holdout`` (``make demo``) trains one run of
            each model and evaluates it on its validation cases; ``scheme: kfold`` (the
            cross-validated demo, ``configs/demo_cv.yaml``) trains every fold of each model (this
            split is applied to each experiment before ``train_overrides``) and evaluates each
            model out-of-fold on every case.
        train_configs: experiment files of the models the demo trains on its synthetic cases,
            one after the other (empty: no training); ``train_overrides``: ``section.key=value``
            changes applied to each.
        bootstrap_resamples: resamples of the comparison report's confidence intervals.
        postprocess: score post-processed predictions (the largest kidney components, tumour
            touching kidney only; as ``--postprocess`` of the evaluation scripts) instead of the
            raw ones; the README's results block says which.
        readme: a README whose demo results block (see :mod:`utils.cli.demo_results`) the demo
            rewrites with its own figures (``None``: leave every README alone). Holdout KiTS19 demo
            only: the cross-validated demo writes its results to ``<reports_dir>/results.md``.
        dataset: which challenge's data the demo generates and trains on: ``kits19`` (``make
            demo``) or ``kits23`` (``configs/demo_kits23.yaml``: KiTS23-style cases with labelled
            cysts, scored by evaluation region); every experiment of ``train_configs`` must name it.
    """

    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    patches: PatchDatasetConfig = field(default_factory=PatchDatasetConfig)
    slices: SliceDatasetConfig = field(default_factory=SliceDatasetConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    seed: int = 0
    reports_dir: str = "reports/demo"
    train_configs: tuple[str, ...] = ("configs/resunet3d_quick.yaml", "configs/unetr2d_quick.yaml")
    train_overrides: tuple[str, ...] = ()
    bootstrap_resamples: int = 10000
    postprocess: bool = False
    readme: str | None = None
    dataset: str = "kits19"

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_LABEL_COUNTS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASET_LABEL_COUNTS)} "
                             f"(the demo config's 'dataset:' key)")
        if self.dataset != "kits19" and self.cross_validation:
            raise ValueError(f"split.scheme: kfold: the cross-validated demo runs on KiTS19 only; for {self.dataset} "
                             "use the holdout demo (configs/demo_kits23.yaml) or scripts/cross_validate.py on "
                             "the demo's data")
        if self.dataset != "kits19" and self.readme is not None:
            raise ValueError(f"readme: the README's results block holds the KiTS19 demo's figures; a {self.dataset} "
                             "demo prints its figures and writes <reports_dir>/dataset_summary.json instead, so set "
                             "readme: null")
        if self.cross_validation and self.readme is not None:
            raise ValueError("readme: the README's results block holds the holdout demo's figures; the "
                             "cross-validated demo (split.scheme: kfold) writes <reports_dir>/results.md "
                             "instead, so set readme: null")
        if self.cross_validation and self.synthetic.cases < self.split.folds:
            raise ValueError(f"synthetic.cases ({self.synthetic.cases}) must be at least split.folds "
                             f"({self.split.folds}): every fold needs a validation case")

    @property
    def cross_validation(self) -> bool:
        """Whether this is the cross-validated demo (``split.scheme: kfold``)."""
        return self.split.scheme == "kfold"
