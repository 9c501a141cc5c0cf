"""The built-in generator of synthetic KiTS19- or KiTS23-style cases: anatomy, tissues, CT, and whole datasets."""
