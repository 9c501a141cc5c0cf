"""KiTS19 scores of label maps: Dice on any grid, surface Dice and HD95 in mm, per case and summarised."""
