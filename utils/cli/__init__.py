"""Command glue: the argparse-level functions behind scripts/ and the end-to-end demo."""
