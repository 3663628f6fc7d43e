"""`python -m aiguillage.cli`: the same as the `aiguillage` command."""

from aiguillage.cli import app

app()
