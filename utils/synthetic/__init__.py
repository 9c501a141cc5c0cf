"""The built-in generator of synthetic KiTS19-style cases: anatomy, tissues, CT, and whole datasets."""
