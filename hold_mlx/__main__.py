"""``python -m hold_mlx``: the hold-mlx command line."""

from .cli import main

main(prog_name="hold-mlx")
