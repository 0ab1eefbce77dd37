"""Compression: pruning (Alg 1-5), weight sharing (Alg 6), sizes (Eq 6-7) and the compressed file.

Imports ``rclib.core`` and ``rclib.nn``.
"""
