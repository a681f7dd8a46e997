"""``python -m rnnlab <command>``: the ``rnnlab`` command (rnnlab.cli)."""

from rnnlab.cli import main

main()
