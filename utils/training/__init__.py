"""Training: optimisation, speed options, stop signals, run folders, tracking, set-up, the engine, the search."""
