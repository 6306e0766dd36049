"""The root of hybridlm's error classes, in a module with no imports.

It lives apart from :mod:`hybridlm.errors` so that :mod:`hybridlm.pattern` (pure Python, the
bottom layer) can derive ``PatternError`` from it while ``hybridlm.errors`` imports
``PatternError``: neither module has to import the other's package first.
"""


class HybridLMError(Exception):
    """Base class of hybridlm's own errors."""

    # Shown and pickled under the public module that re-exports it.
    __module__ = "hybridlm.errors"
