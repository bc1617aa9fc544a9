"""What is made from a run folder after (or while) it renders: checks, comparisons, views."""
