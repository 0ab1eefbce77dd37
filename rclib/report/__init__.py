"""What a reader sees: verdicts, figures, explorers, the book's pages and its runner.

The top floor: imports from every other subpackage; nothing imports from here.
"""
