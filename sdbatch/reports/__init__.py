"""What is made from a run folder after (or while) it renders: grids, listings, the gallery,
checks and comparisons."""
