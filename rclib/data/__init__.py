"""Datasets and their seeded splits (paper Sec. 3): digits, torchvision sets and image folders.

Imports only ``rclib.core``.
"""
