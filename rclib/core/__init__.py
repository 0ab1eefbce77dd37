"""The ground floor: settings, the artifact cache, device handling, the paper's quoted numbers.

Imports nothing else from rclib. Every other subpackage may import from here.
"""
