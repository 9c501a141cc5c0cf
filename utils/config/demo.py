"""Settings of the end-to-end demo (``configs/demo.yaml``)."""

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
        train_configs: experiment files of the models the demo trains on its synthetic cases,
            one after the other (empty: no training); ``train_overrides``: ``section.key=value``
            changes applied to each.
        bootstrap_resamples: resamples of the comparison report's confidence intervals.
        readme: a README whose demo results block (see :mod:`utils.cli.demo_results`) the demo
            rewrites with its own figures (``None``: leave every README alone).
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

