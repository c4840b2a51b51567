"""The Hydra configuration (config.yaml and its groups), shipped in the wheel as `mu_runner.conf`.

In a clone it is this folder; `pyproject.toml` maps it into the package."""
