"""What is made from a run folder after (or while) its images are written: grids, listings."""
