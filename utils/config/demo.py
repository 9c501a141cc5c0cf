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
        readme: a README whose demo results block (see :mod:`utils.cli.demo_results`) the demo
            rewrites with its own figures (``None``: leave every README alone). Holdout demo only:
            the cross-validated demo writes its results to ``<reports_dir>/results.md``.
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
    readme: str | None = None

    def __post_init__(self) -> None:
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
