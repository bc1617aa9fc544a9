"""Hydra config groups shipped with sdbatch (config.yaml, model/, executor/)."""
