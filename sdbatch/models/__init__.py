"""Model stacks: resolving, hashing and loading checkpoints; the embedded tiny model."""
