"""Executors take a plan's batches to devices: local (one device) for now."""
