"""The networks (paper App. B) and how they are trained, evaluated and timed.

Imports ``rclib.core`` and ``rclib.data``.
"""
