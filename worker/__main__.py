"""`python -m worker` is the `segment-worker` command."""

from worker.cli import app

app(prog_name="segment-worker")
