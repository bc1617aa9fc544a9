"""sdbatch: Stable Diffusion jobs written once in Hydra YAML, rendered in batch."""

__version__ = "0.3.0"
