"""One module per stage kind; each renders a batch of images on a loaded stack."""
