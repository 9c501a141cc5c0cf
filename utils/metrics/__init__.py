"""KiTS19 scores of label maps: Dice on any grid (``dice``), surface Dice and HD95 in mm
(``surface``), one per-case scorer and one summary over cases (``scoring``)."""
