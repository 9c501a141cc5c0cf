"""Looking at a dataset before training: label and HU statistics, slice statistics, separability, tables."""
