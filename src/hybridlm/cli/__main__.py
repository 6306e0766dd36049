"""``python -m hybridlm.cli`` (and under torchrun): the ``hybridlm`` command."""

from . import entry

entry()
