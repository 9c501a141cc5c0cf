"""Evaluation in the original grid: score predictions, evaluate a run, compare models, write the report."""
