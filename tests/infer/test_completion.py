"""`infer.completion.Completion`: a row's text as its tokens arrive, cut at stop strings (``hybridlm generate`` and
``hybridlm serve``)."""

from hybridlm.infer.completion import Completion
from hybridlm.train.tokenizer import ByteTokenizer


def test_the_completion_keeps_the_space_a_decoder_strips_at_the_start():

    class Metaspace:  # decodes like sentencepiece: "▁" becomes a space, and a leading space is dropped
        def decode(self, ids):
            return "".join(("▁Hello", "▁world")[i] for i in ids).replace("▁", " ").removeprefix(" ")

    row = Completion(Metaspace(), [], stream=False, prompt=[0])
    row.add(1)
    assert row.text == " world"


def test_a_long_completion_decodes_a_bounded_window_per_token_and_the_same_text(capsys):
    """Each token decoded the whole completion again: quadratic (8,000 tokens: 0.55 ms a token)."""

    class Counting(ByteTokenizer):
        longest = 0

        def decode(self, ids):
            Counting.longest = max(Counting.longest, len(ids))
            return super().decode(ids)

    text = "héllo wörld ✓ 日本語 " * 60 + "STOP here"
    ids = list(text.encode())
    for stream in (False, True):
        row = Completion(Counting(), ["STOP", "語 h"], stream, prompt=[65, 66], heading="")
        stopped_at = next(i for i, t in enumerate(ids) if row.add(t))
        row.finish()
        assert row.text == "héllo wörld ✓ 日本" and stopped_at == len("héllo wörld ✓ 日本語 h".encode()) - 1
        row = Completion(Counting(), ["STOP"], stream, prompt=[65, 66], heading="")
        assert not any(row.add(t) for t in ids[: -len("STOP here")])
        row.finish()
        assert row.text == text[: -len("STOP here")] and row.settled > len(ids) - 3 * Completion.WINDOW
        assert capsys.readouterr().out == (2 * "" if not stream else "héllo wörld ✓ 日本" + row.text)
    assert Counting.longest <= 2 * Completion.WINDOW + Completion.CONTEXT
