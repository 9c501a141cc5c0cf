"""Raw data: the KiTS19 layout, NIfTI reading and checks, case discovery and validation, the case split."""
