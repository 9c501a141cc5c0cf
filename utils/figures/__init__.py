"""Figures: slice overlays, statistics, training curves, evaluation and comparison plots, meshes, viewers."""
