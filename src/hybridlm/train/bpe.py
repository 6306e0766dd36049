"""A byte-level BPE tokenizer trained on a corpus (``hybridlm tokenizer``), with the tokenizers package.

GPT-2's scheme, as most hybrid models' tokenizers are built: text is split by GPT-2's pre-tokenization pattern, each
piece is taken as UTF-8 bytes written in GPT-2's byte alphabet, and merges of frequent neighbours are learned on
top. So every text encodes (no unknown token, any language or control character) and decodes back to itself, and
the vocabulary holds the 256 bytes, ``<|endoftext|>`` (id 0: the end-of-document token that
:class:`~hybridlm.train.tokenizer.HFTokenizer` finds by name) and the merges. The file is a ``tokenizer.json`` that
``data.tokenizer``, ``hybridlm prepare --tokenizer``, transformers' ``PreTrainedTokenizerFast`` and the tokenizers
package load as they load any other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from ..errors import DataError
from .chats import ChatDocument
from .tokenizer import HF_EOS

#: The smallest vocabulary: the 256 bytes and the end-of-document token (no merge).
MIN_VOCAB = 257


def document_texts(documents: Iterable[str | ChatDocument]) -> Iterator[str]:
    """The texts a tokenizer learns from: each document, and each message's text of a conversation (a record's
    ``messages``; their roles and a chat template's markup are a handful of tokens any vocabulary spells)."""
    for doc in documents:
        if isinstance(doc, ChatDocument):
            messages = doc.messages if isinstance(doc.messages, list) else []
            for message in messages:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, str):
                    yield content
                elif isinstance(content, list):  # OpenAI's parts: [{"type": "text", "text": ...}, ...]
                    yield from (p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        else:
            yield doc


def train_bpe(
    documents: Iterable[str | ChatDocument],
    vocab_size: int,
    min_frequency: int = 2,
    progress: bool = False,
    special_tokens: Sequence[str] = (),
) -> str:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens at most, learned on ``documents``, as tokenizer.json text.

    Args:
        documents: texts, or conversations (:func:`document_texts`), read once.
        vocab_size: tokens in all: the 256 bytes, ``<|endoftext|>``, the ``special_tokens`` and the merges (fewer
            where the corpus has fewer pairs seen ``min_frequency`` times).
        min_frequency: how often a pair must occur to be merged.
        progress: the tokenizers package's progress bars, on standard error.
        special_tokens: more special tokens, ids 1, 2, ... after ``<|endoftext|>``: a chat template's markers
            (``<|im_start|>``, ``<|im_end|>``), each then one token, matched whole in a text and left out of a decoded
            one.
    """
    specials = [HF_EOS, *special_tokens]
    if not all(isinstance(t, str) and t.strip() for t in specials) or len(set(specials)) < len(specials):
        raise DataError(
            f"--special-token: each must be a distinct, non-blank text other than {HF_EOS}, got {list(special_tokens)}"
        )
    least = MIN_VOCAB + len(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < least:
        raise DataError(
            f"--vocab-size must be an integer >= {least} (the 256 bytes and {len(specials)} special "
            f"token{'s' * (len(specials) > 1)}), got {vocab_size!r}"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise DataError(f"--min-frequency must be an integer >= 1, got {min_frequency!r}")
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DataError(
            "training a tokenizer needs the tokenizers package: pip install 'hybridlm[tokenizers]'"
        ) from None
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space off: a document's first word is not given a space it did not have (decode gives the text back).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen in the corpus or not
        show_progress=progress,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in document_texts(documents):
            seen += 1
            yield text

    tokenizer.train_from_iterator(counted(), trainer)
    if seen == 0:
        raise DataError("the corpus holds no text to learn from")
    return tokenizer.to_str(pretty=True)
