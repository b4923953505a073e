"""The child process of ``_openmp.run``: ``python -m cpa_stream._child`` runs one job read from
standard input and writes its result (and progress) to standard output."""

from ._openmp import _child

_child()
