"""`python -m cpa_stream.fidelity`."""

from .cli import main

main()
