"""KiTS19 kidney and kidney-tumour segmentation toolkit: the package every notebook and script calls."""
