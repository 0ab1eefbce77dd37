"""The cached steps the chapters run: one module per chapter's experiment, plus torchrun.

Imports every subpackage below it (``core``, ``data``, ``nn``, ``compress``, ``robust``).
"""
