"""Attacks (Eq 3-5, 8), Algorithm 7's margin loss, and decision boundaries (Sec 3.3).

Imports ``rclib.core``, ``rclib.data`` and ``rclib.nn``.
"""
