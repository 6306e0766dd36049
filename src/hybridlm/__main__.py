"""``python -m hybridlm``: the ``hybridlm`` command (as ``python -m hybridlm.cli``)."""

from .cli import entry

entry()
