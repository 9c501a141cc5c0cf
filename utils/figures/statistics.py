"""Figures of dataset statistics: distributions over cases (:mod:`utils.analysis.dataset_statistics`) and over
axial slices (:mod:`utils.analysis.slice_statistics`), and a gallery of sampled training slices.

Every function builds a new :class:`~matplotlib.figure.Figure` without pyplot, so nothing is
shown, registered or changed globally (no rcParams, no random state); display it in a notebook
by making it a cell's value, save it with :func:`utils.figures.drawing.save_figure`. Kidney and
tumour take their colours from :data:`utils.figures.drawing.LABEL_COLOURS`; the cyst (KiTS23's label 3)
takes ``CYST_COLOUR``. Figures of case statistics show cyst series only for cases of a dataset with a
cyst label (KiTS23); KiTS19 figures have none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from utils.analysis.dataset_statistics import (
    CYST_NAME,
    HU_HISTOGRAM_RANGE,
    CaseStatistics,
    class_names,
    compute_histogram_percentile,
)
from utils.analysis.slice_statistics import SLICE_CLASS_NAMES, SamplingShares, SliceAreas, classify_slices
from utils.data.dataset_definitions import CYST_LABEL, KITS19, DatasetDefinition, get_dataset
from utils.data.kits_layout import BACKGROUND_LABEL, KIDNEY_LABEL, TUMOUR_LABEL
from utils.figures.drawing import CYST_COLOUR, LABEL_COLOURS

#: Background is not a label colour in LABEL_COLOURS; it is drawn in neutral grey.
BACKGROUND_COLOUR = "0.45"
#: Colours of the KiTS19 classes (background, kidney, tumour), also of the slice classes
#: (background only, kidney without tumour, contains tumour).
CLASS_COLOURS = (BACKGROUND_COLOUR, LABEL_COLOURS[KIDNEY_LABEL], LABEL_COLOURS[TUMOUR_LABEL])
#: Largest number of histogram bins drawn for a per-case quantity.
MAX_BINS = 30


def _new_figure(columns: int = 1, width: float = 5.0, height: float = 3.4) -> tuple[Figure, list[Axes]]:
    """A new figure with ``columns`` axes side by side, not registered with pyplot."""
    figure = Figure(figsize=(width * columns, height), layout="constrained")
    return figure, list(figure.subplots(1, columns, squeeze=False)[0])


def class_colours(dataset: str | DatasetDefinition = KITS19) -> tuple[str, ...]:
    """Colour of every class of a dataset in label order: grey background, then the label colours (cyst purple)."""
    dataset = get_dataset(dataset)
    colours = {BACKGROUND_LABEL: BACKGROUND_COLOUR, **LABEL_COLOURS}
    if dataset.has_label(CYST_NAME):
        colours.setdefault(dataset.label(CYST_NAME), CYST_COLOUR)
    return tuple(colours[label] for label in sorted(dataset.labels))


def _cases(statistics: Iterable[CaseStatistics]) -> list[CaseStatistics]:
    cases = list(statistics)
    if not cases:
        raise ValueError("statistics must hold at least one case, got none")
    datasets = sorted({case.dataset for case in cases})
    if len(datasets) > 1:
        raise ValueError(f"statistics must all be of one dataset, got cases of {', '.join(datasets)}")
    return cases


def _with_cyst(cases: Sequence[CaseStatistics]) -> bool:
    """Whether the cases (all of one dataset, see :func:`_cases`) have cyst statistics."""
    return cases[0].has_cyst_label


def _bins(values: Sequence[float]) -> int:
    """Number of histogram bins: about one per distinct value, at most ``MAX_BINS``."""
    return int(min(MAX_BINS, max(len(set(values)), 1)))


def plot_slices_per_case(statistics: Iterable[CaseStatistics]) -> Figure:
    """Histogram of the number of axial slices per case (one axis)."""
    slices = [case.shape[0] for case in _cases(statistics)]
    figure, (ax,) = _new_figure()
    ax.hist(slices, bins=_bins(slices), color=BACKGROUND_COLOUR)
    ax.set(xlabel="axial slices per case", ylabel="cases",
           title=f"{len(slices)} cases: slices {min(slices)} to {max(slices)}, median {np.median(slices):g}")
    return figure


def plot_spacing_distributions(statistics: Iterable[CaseStatistics]) -> Figure:
    """Histograms of the slice thickness (z) and of the in-plane pixel size (y and x), in mm (two axes)."""
    cases = _cases(statistics)
    figure, (ax_z, ax_plane) = _new_figure(2)
    z = [case.spacing[0] for case in cases]
    ax_z.hist(z, bins=_bins(z), color=BACKGROUND_COLOUR)
    ax_z.set(xlabel="slice spacing z (mm)", ylabel="cases", title=f"slice spacing, median {np.median(z):.2f} mm")
    for axis, name, style in ((1, "rows (y)", "stepfilled"), (2, "columns (x)", "step")):
        values = [case.spacing[axis] for case in cases]
        ax_plane.hist(values, bins=_bins(values), histtype=style, alpha=0.6 if style == "stepfilled" else 1.0,
                      color=BACKGROUND_COLOUR if axis == 1 else "black", label=name)
    ax_plane.set(xlabel="in-plane pixel size (mm)", ylabel="cases", title="in-plane pixel size")
    ax_plane.legend(frameon=False)
    return figure


def plot_class_proportions(statistics: Iterable[CaseStatistics]) -> Figure:
    """Per case, the share of voxels that are kidney and tumour (and cyst, KiTS23), in %, as stacked bars (one axis)."""
    cases = _cases(statistics)
    series = [("kidney (label 1)", KIDNEY_LABEL, LABEL_COLOURS[KIDNEY_LABEL]),
              ("tumour (label 2)", TUMOUR_LABEL, LABEL_COLOURS[TUMOUR_LABEL])]
    if _with_cyst(cases):
        cyst_label = cases[0].definition.label(CYST_NAME)
        series.append((f"cyst (label {cyst_label})", cyst_label, CYST_COLOUR))
    figure, (ax,) = _new_figure(width=max(5.0, min(14.0, 0.08 * len(cases))))
    positions, bottom = np.arange(len(cases)), np.zeros(len(cases))
    for name, label, colour in series:
        shares = np.array([100 * case.class_proportions[label] for case in cases])
        ax.bar(positions, shares, width=0.9, bottom=bottom, color=colour,
               label=f"{name}, median {np.median(shares):.2f} %")
        bottom += shares
    if len(cases) <= 20:
        ax.set_xticks(positions, [case.case_id.removeprefix("case_") for case in cases], rotation=90)
    names = "kidney, tumour and cyst" if _with_cyst(cases) else "kidney and tumour"
    ax.set(xlabel="case", ylabel="% of the case's voxels", title=f"{names} share of the voxels")
    figure.legend(frameon=False, loc="outside lower center")
    return figure


def plot_volume_distributions(statistics: Iterable[CaseStatistics]) -> Figure:
    """Histograms of kidney (label 1, and the composite as a line) and tumour (label 2) volumes in ml (two axes).

    The composite is label > 0: kidney + tumour in KiTS19, kidney and masses (labels 1, 2, 3) in
    KiTS23. With a cyst label a third axis shows the cyst volume of the cases that have a cyst.
    """
    cases = _cases(statistics)
    with_cyst = _with_cyst(cases)
    figure, axes = _new_figure(3 if with_cyst else 2)
    ax_kidney, ax_tumour = axes[:2]
    kidney = [case.kidney_ml for case in cases]
    if with_cyst:
        composite = [float(case.kidney_and_masses_ml) for case in cases]  # type: ignore[arg-type]
        composite_name = "kidney and masses (labels 1, 2, 3)"
    else:
        composite, composite_name = [case.kidney_tumour_ml for case in cases], "kidney + tumour (label > 0)"
    edges = np.histogram_bin_edges(kidney + composite, bins=_bins(kidney + composite))
    ax_kidney.hist(kidney, bins=edges, color=LABEL_COLOURS[KIDNEY_LABEL], alpha=0.7, label="kidney (label 1)")
    ax_kidney.hist(composite, bins=edges, histtype="step", color="black", label=composite_name)
    ax_kidney.set(xlabel="volume (ml)", ylabel="cases", title=f"kidney, median {np.median(kidney):.0f} ml")
    ax_kidney.legend(frameon=False)
    tumour = [case.tumour_ml for case in cases]
    ax_tumour.hist(tumour, bins=_bins(tumour), color=LABEL_COLOURS[TUMOUR_LABEL], alpha=0.7)
    ax_tumour.set(xlabel="volume (ml)", ylabel="cases", title=f"tumour (label 2), median {np.median(tumour):.1f} ml")
    if with_cyst:
        cyst = [float(case.cyst_ml) for case in cases if case.cysts]  # type: ignore[arg-type]
        _plot_cyst_volumes(axes[2], cyst, len(cases), cases[0].definition.label(CYST_NAME))
    return figure


def _plot_cyst_volumes(ax: Axes, volumes: list[float], n_cases: int, label: int) -> None:
    """Histogram of the cyst volumes (ml) of the cases that have a cyst, or a note when none has."""
    if volumes:
        ax.hist(volumes, bins=_bins(volumes), color=CYST_COLOUR, alpha=0.7)
        title = f"cyst (label {label}): {len(volumes)} of {n_cases} cases, median {np.median(volumes):.1f} ml"
    else:
        ax.text(0.5, 0.5, "no case has a cyst", ha="center", va="center", transform=ax.transAxes)
        title = f"cyst (label {label}): none in {n_cases} cases"
    ax.set(xlabel="volume (ml)", ylabel="cases with a cyst", title=title)


def plot_tumours_per_case(statistics: Iterable[CaseStatistics]) -> Figure:
    """Bar chart of how many cases have 0, 1, 2, ... tumours (26-connected components of label 2; one axis).

    With a cyst label (KiTS23) a second axis counts cysts (26-connected components of label 3) the same way.
    """
    cases = _cases(statistics)
    series = [("tumours", TUMOUR_LABEL, LABEL_COLOURS[TUMOUR_LABEL], [case.tumours for case in cases])]
    if _with_cyst(cases):
        series.append(("cysts", cases[0].definition.label(CYST_NAME), CYST_COLOUR, [case.cysts for case in cases]))
    figure, axes = _new_figure(len(series))
    for ax, (name, label, colour, values) in zip(axes, series, strict=True):
        counts = np.bincount(values)
        ax.bar(np.arange(counts.size), counts, color=colour)
        ax.set_xticks(np.arange(counts.size))
        ax.set(xlabel=f"{name} per case (connected components of label {label})", ylabel="cases",
               title=f"{name} per case")
    return figure


def plot_slice_shares(statistics: Iterable[CaseStatistics]) -> Figure:
    """Histograms of the share of a case's axial slices holding kidney (label > 0) and tumour (label 2), in %.

    With a cyst label (KiTS23) the cyst (label 3) is a third series.
    """
    cases = _cases(statistics)
    figure, (ax,) = _new_figure()
    bins = np.linspace(0, 100, 21)
    series = [("kidney (label > 0)", LABEL_COLOURS[KIDNEY_LABEL], [c.kidney_slice_share for c in cases]),
              ("tumour (label 2)", LABEL_COLOURS[TUMOUR_LABEL], [c.tumour_slice_share for c in cases])]
    if _with_cyst(cases):
        series.append((f"cyst (label {cases[0].definition.label(CYST_NAME)})", CYST_COLOUR,
                       [c.cyst_slice_share for c in cases]))
    for name, colour, shares in series:
        ax.hist(100 * np.asarray(shares), bins=bins, color=colour, alpha=0.6, label=name)
    names = "kidney, tumour and cyst" if _with_cyst(cases) else "kidney and tumour"
    ax.set(xlabel="% of the case's axial slices", ylabel="cases", title=f"slices holding {names}")
    ax.legend(frameon=False)
    return figure


def plot_hu_histograms(histograms: np.ndarray, *, bin_width: int = 5,
                       clip_percentiles: tuple[float, float] = (0.05, 99.95),
                       dataset: str | DatasetDefinition = KITS19) -> Figure:
    """Distribution of HU per class (background, kidney, tumour; KiTS23 also cyst), each normalised to sum 1, log y.

    One axis; a class without voxels is left out.

    Args:
        histograms: ``(classes, 4096)`` voxel counts per class of ``dataset`` and integer HU, bin
            ``i`` holding ``HU_HISTOGRAM_RANGE[0] + i`` (from
            :func:`~utils.analysis.dataset_statistics.accumulate_hu_histograms`).
        bin_width: HU per drawn bin (1 to 64); counts of neighbouring integer HU are summed.
        clip_percentiles: the HU axis spans these percentiles of every class that has voxels.
        dataset: the dataset definition (or its name) whose classes the rows are.
    """
    dataset = get_dataset(dataset)
    histograms = np.asarray(histograms)
    expected = (dataset.num_classes, HU_HISTOGRAM_RANGE[1] - HU_HISTOGRAM_RANGE[0])
    if histograms.shape != expected or (histograms < 0).any():
        raise ValueError(f"histograms must be {expected} counts >= 0, got shape {histograms.shape}; one row per "
                         f"{dataset.title} class ({dataset.describe_labels()}): pass the dataset the statistics "
                         f"were computed with as dataset=")
    if not histograms.any():
        raise ValueError("histograms hold no voxels; compute statistics on cases with imaging first")
    if not 1 <= bin_width <= 64:
        raise ValueError(f"bin_width must be between 1 and 64 HU, got {bin_width}")
    figure, (ax,) = _new_figure(width=8.5)
    starts = np.arange(*HU_HISTOGRAM_RANGE, bin_width)
    limits = []
    for name, colour, counts in zip(class_names(dataset), class_colours(dataset), histograms, strict=True):
        if counts.sum() == 0:
            continue
        binned = np.add.reduceat(counts, np.arange(0, counts.size, bin_width))
        fraction = np.where(binned > 0, binned / counts.sum(), np.nan)
        ax.stairs(fraction, np.append(starts, HU_HISTOGRAM_RANGE[1]), baseline=None, color=colour,
                  label=f"{name} ({counts.sum():,} voxels)")
        limits += [compute_histogram_percentile(counts, q) for q in clip_percentiles]
    ax.set_yscale("log")
    ax.set_xlim(min(limits) - 2 * bin_width, max(limits) + 2 * bin_width)
    ax.set(xlabel=f"HU ({bin_width} HU bins; values outside [{HU_HISTOGRAM_RANGE[0]}, {HU_HISTOGRAM_RANGE[1] - 1}] "
                  "counted in the end bins)",
           ylabel="fraction of the class's voxels", title="HU distribution per class")
    figure.legend(frameon=False, loc="outside right upper")
    return figure


def plot_slice_class_counts(counts: Sequence[int] | np.ndarray) -> Figure:
    """Bar chart of the number of axial slices per slice class (background only, kidney, tumour; one axis).

    Args:
        counts: ``(3,)`` slice counts from :func:`~utils.analysis.slice_statistics.compute_slice_class_counts`.
    """
    counts = np.asarray(counts)
    if counts.shape != (len(SLICE_CLASS_NAMES),) or (counts < 0).any():
        raise ValueError(f"counts must be {len(SLICE_CLASS_NAMES)} slice counts >= 0, got {counts.tolist()}")
    figure, (ax,) = _new_figure()
    ax.bar(SLICE_CLASS_NAMES, counts, color=list(CLASS_COLOURS))
    total = max(int(counts.sum()), 1)
    for position, count in enumerate(counts):
        ax.annotate(f"{100 * count / total:.1f} %", (position, count), ha="center", va="bottom")
    ax.set(ylabel="axial slices", title=f"{int(counts.sum())} axial slices by class")
    return figure


def plot_slice_classes_per_case(counts: Mapping[str, Sequence[int] | np.ndarray]) -> Figure:
    """Per case, its axial slices by class as stacked bars: tumour at the bottom, kidney, background (one axis).

    Args:
        counts: ``case_id`` -> ``(3,)`` slices (background only, kidney without tumour, contains
            tumour), from :func:`~utils.analysis.slice_statistics.count_slice_classes_per_case`.
    """
    table = np.array([np.asarray(values) for values in counts.values()])
    if table.ndim != 2 or table.shape[1] != len(SLICE_CLASS_NAMES) or (table < 0).any():
        raise ValueError(f"counts must map at least one case id to {len(SLICE_CLASS_NAMES)} slice counts >= 0, "
                         f"got an array of shape {table.shape}")
    figure, (ax,) = _new_figure(width=max(7.5, min(16.0, 2.5 + 0.08 * len(table))))
    positions, bottom = np.arange(len(table)), np.zeros(len(table))
    for name, colour, column in reversed(list(zip(SLICE_CLASS_NAMES, CLASS_COLOURS, table.T, strict=False))):
        ax.bar(positions, column, width=0.9, bottom=bottom, color=colour, label=f"{name} ({column.sum()})")
        bottom += column
    if len(table) <= 20:
        ax.set_xticks(positions, [case_id.removeprefix("case_") for case_id in counts], rotation=90)
    ax.set(xlabel="case", ylabel="axial slices",
           title=f"{int(table.sum())} axial slices of {len(table)} cases by class")
    handles, names = ax.get_legend_handles_labels()
    figure.legend(handles[::-1], names[::-1], frameon=False, loc="outside right upper")  # top of the stack first
    return figure


def plot_slice_areas(areas: SliceAreas) -> Figure:
    """Histograms of kidney (label > 0) and tumour (label 2) area per axial slice in mm² (two axes).

    Args:
        areas: from :func:`~utils.analysis.slice_statistics.compute_case_slice_areas`: only slices holding the class.
    """
    figure, axes = _new_figure(2)
    for ax, name, label, values in ((axes[0], "kidney (label > 0)", KIDNEY_LABEL, areas.kidney_mm2),
                                    (axes[1], "tumour (label 2)", TUMOUR_LABEL, areas.tumour_mm2)):
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or not (values > 0).all():
            raise ValueError(f"areas of {name} must be a 1D array of areas > 0 mm², got shape {values.shape}")
        if values.size:
            ax.hist(values, bins=_bins(values.tolist()), color=LABEL_COLOURS[label])
            title = f"{name}: {values.size} slices, median {np.median(values):.0f} mm²"
        else:
            ax.text(0.5, 0.5, "no slice holds it", ha="center", va="center", transform=ax.transAxes)
            title = f"{name}: no slices"
        ax.set(xlabel="area per axial slice (mm²)", ylabel="axial slices", title=title)
    return figure


def plot_sampling_shares(shares: SamplingShares) -> Figure:
    """Configured (hatched, ± 2 standard errors) and realised share of each slice class when sampling, in % (one axis).

    About 95 % of the time the realised share of a class lies within the configured one's error bar.
    """
    configured, realised = np.asarray(shares.configured), np.asarray(shares.realised)
    if configured.shape != (len(SLICE_CLASS_NAMES),) or realised.shape != configured.shape:
        raise ValueError(f"shares must hold {len(SLICE_CLASS_NAMES)} configured and realised shares, "
                         f"got shapes {configured.shape} and {realised.shape}")
    figure, (ax,) = _new_figure(width=6.5)
    positions = np.arange(len(SLICE_CLASS_NAMES))
    ax.bar(positions - 0.2, 100 * configured, width=0.4, color="white", edgecolor=CLASS_COLOURS, hatch="//",
           yerr=200 * shares.standard_errors, capsize=4, label="configured (± 2 standard errors)")
    bars = ax.bar(positions + 0.2, 100 * realised, width=0.4, color=CLASS_COLOURS,
                  label=f"realised in {shares.n_samples} sampled slices")
    ax.bar_label(bars, [f"{100 * share:.1f} %" for share in realised], fontsize=8)
    ax.set_xticks(positions, SLICE_CLASS_NAMES)
    ax.set(ylabel="% of sampled slices", title="slice classes drawn by the class-balanced sampler")
    ax.legend(frameon=False)
    return figure


def plot_slice_gallery(items: Sequence[Mapping[str, Any]], *, columns: int = 4,
                       window: tuple[float, float] | None = None) -> Figure:
    """Sampled training slices in grey with kidney (label > 0) and tumour (label 2) contours, one panel per item.

    Cyst (label 3, KiTS23) gets its own contour and legend entry when an item holds it.

    Args:
        items: at least one dataset item (as from a ``SliceDataset``): ``image`` ``(1, S, S)``
            float (normalised), ``label`` ``(1, S, S)`` integer, ``case_id``, ``slice_index``,
            ``slice_class`` (0, 1, 2); arrays or CPU tensors.
        columns: panels per row (>= 1).
        window: ``(low, high)`` image values shown black and white; default the 0.5th and 99.5th
            percentiles of all items' pixels, so intensity changes between items stay visible.
    """
    if not items or columns < 1:
        raise ValueError(f"items must hold at least one item and columns must be >= 1, "
                         f"got {len(items)} items and columns={columns}")
    images = [np.asarray(item["image"], dtype=np.float32) for item in items]
    labels = [np.asarray(item["label"]) for item in items]
    for index, (image, label) in enumerate(zip(images, labels, strict=False)):
        if image.ndim != 3 or image.shape[0] != 1 or label.shape != image.shape:
            raise ValueError(f"items[{index}]: image and label must both be (1, S, S), "
                             f"got {image.shape} and {label.shape}")
    if window is None:
        window = tuple(np.percentile(np.concatenate([image.ravel() for image in images]), (0.5, 99.5)))
    elif not window[0] < window[1]:
        raise ValueError(f"window must be (low, high) with low < high, got {window}")
    columns = min(columns, len(items))
    rows = math.ceil(len(items) / columns)
    figure = Figure(figsize=(2.6 * columns, 2.8 * rows + 0.3), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    contour_colours = {**LABEL_COLOURS}
    contour_colours.setdefault(CYST_LABEL, CYST_COLOUR)
    for ax, item, image, label in zip(axes, items, images, labels, strict=False):
        ax.imshow(image[0], cmap="gray", vmin=window[0], vmax=window[1], interpolation="nearest")
        for value, colour in contour_colours.items():
            mask = label[0] >= value if value == KIDNEY_LABEL else label[0] == value
            if mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0)
        slice_class = SLICE_CLASS_NAMES[int(item["slice_class"])]
        ax.set_title(f"{item['case_id']}, slice {item['slice_index']}\n{slice_class}", fontsize=8)
    handles = [Line2D([], [], color=LABEL_COLOURS[KIDNEY_LABEL], label="kidney (label > 0)"),
               Line2D([], [], color=LABEL_COLOURS[TUMOUR_LABEL], label="tumour (label 2)")]
    if any((label == CYST_LABEL).any() for label in labels):
        handles.append(Line2D([], [], color=contour_colours[CYST_LABEL], label=f"cyst (label {CYST_LABEL})"))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return figure


def plot_training_samples(samples: Sequence[Mapping[str, Any]], *, columns: int = 4) -> Figure:
    """Training samples as a model sees them (augmented, normalised), in one gallery.

    2D slices are shown as they are; a 3D patch is shown by its middle axial slice, titled with
    the class its centre was drawn on.

    Args:
        samples: items of a patch dataset (``image`` and ``label`` ``(1, Z, Y, X)``, ``case_id``,
            ``centre_class``) or of a slice dataset (see :func:`plot_slice_gallery`), in any mix.
        columns: panels per row (>= 1).
    """
    items = []
    for sample in samples:
        image, label = np.asarray(sample["image"]), np.asarray(sample["label"])
        if image.ndim == 4:  # a 3D patch (1, Z, Y, X): its middle axial slice
            middle = image.shape[1] // 2
            items.append({"image": image[:, middle], "label": label[:, middle], "case_id": sample["case_id"],
                          "slice_index": f"middle of 3D patch ({sample['centre_class']})",
                          "slice_class": int(classify_slices(label[:, middle])[0])})
        else:
            items.append(sample)
    return plot_slice_gallery(items, columns=columns)
