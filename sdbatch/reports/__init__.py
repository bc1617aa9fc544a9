"""What is made from a run folder after (or while) its images are written: grids, the
gallery, listings, verify and diff. Each reads the run folder only, never the job."""
