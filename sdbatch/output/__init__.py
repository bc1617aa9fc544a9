"""The run folder: atomic files, the manifest, PNG metadata, file names."""
