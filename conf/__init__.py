"""rnnlab's Hydra configs. The build installs this directory as the package ``rnnlab.conf``,
which Hydra reads as ``pkg://rnnlab.conf`` (docs/packaging.md)."""
