"""A conversation held turn by turn: each answer what a fresh generation over the rendered conversation gives, each
turn running only what it adds, the end of turn, Ctrl-C, seeds and refusals."""

import pytest
import torch

from hybridlm import HybridLM, generate
from hybridlm.infer.chat import Chat
from hybridlm.infer.chat_template import ChatTemplate
from hybridlm.infer.conversation import Conversation
from hybridlm.infer.prefixes import SHARED_PREFIX
from hybridlm.train.tokenizer import ByteTokenizer
from tests.helpers import tiny_config

TOKENIZER = ByteTokenizer()
TEMPLATE = ChatTemplate(
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}",
    "test",
)
CHAT = Chat(TEMPLATE, frozenset({TOKENIZER.eos_id}))
MESSAGES = [
    "Tell me about hybrid models that mix state-space layers with attention, please.",
    "And why keep the state after each answer?",
    "Thanks; one more question about the cache.",
]


def ascii_model(pattern: str = "M[*-]G-", dtype=torch.float64) -> HybridLM:
    """A random byte-level model that answers in ASCII: the head's rows for bytes 64-127 are those of 0-63 negated,
    so the largest ASCII logit is never below 0, the logit of every other id (bytes 128-255, the end of text). Its
    answers decode to the bytes it took, so that the next turn's prompt begins with them and a kept state serves."""
    model = HybridLM(tiny_config(pattern, vocab_size=257), seed=0).to(dtype)
    with torch.no_grad():
        w = model.lm_head.weight
        w[64:128] = -w[:64]
        w[128:] = 0
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return ascii_model()


def rendered(messages: list[dict]) -> list[int]:
    return TOKENIZER.encode(TEMPLATE.render(messages))


def test_each_turn_answers_as_a_fresh_generation_over_the_conversation_and_runs_only_what_it_adds(model):
    chat = Conversation(model, TOKENIZER, CHAT, system="Be brief.", max_new_tokens=24)
    whole = Conversation(model, TOKENIZER, CHAT, system="Be brief.", max_new_tokens=24, kept_states=0)
    previous = None
    for text in MESSAGES:
        ids = rendered([*chat.messages, {"role": "user", "content": text}])
        expected = generate(model, ids, max_new_tokens=24, eos_id=TOKENIZER.eos_id)  # (greedy, nothing kept)
        turn, again = chat.reply(text), whole.reply(text)
        assert turn.tokens == expected and turn.text == TOKENIZER.decode(expected) and turn.finish == "length"
        assert (again.tokens, again.kept_tokens, again.run_tokens) == (expected, 0, len(ids))
        assert turn.prompt_tokens == len(ids) and turn.run_tokens == len(ids) - turn.kept_tokens
        if previous is not None:  # the state after the last answer (all its tokens but the last, not yet run)
            assert previous.prompt_tokens + len(previous.tokens) - 1 >= SHARED_PREFIX
            assert turn.kept_tokens == previous.prompt_tokens + len(previous.tokens) - 1
        previous = turn
    assert chat.messages == whole.messages and chat.messages[-1] == {"role": "assistant", "content": turn.text}
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


def test_an_answer_ends_at_an_end_of_turn_id_which_is_none_of_its_text(model):
    free = Conversation(model, TOKENIZER, CHAT, max_new_tokens=12).reply(MESSAGES[0])
    end = free.tokens[3]  # (an id it takes: made an end of turn, the answer stops there)
    stops = Conversation(model, TOKENIZER, Chat(TEMPLATE, frozenset({TOKENIZER.eos_id, end})), max_new_tokens=12)
    turn = stops.reply(MESSAGES[0])
    first = free.tokens.index(end)
    assert turn.finish == "stop" and turn.tokens == free.tokens[: first + 1]
    assert turn.text == TOKENIZER.decode(free.tokens[:first]) and stops.messages[-1]["content"] == turn.text


def test_a_stop_string_ends_an_answer_none_of_its_text_and_the_next_turn_runs_from_it_where_the_template_writes_it(
    model,
):
    free = Conversation(model, TOKENIZER, CHAT, max_new_tokens=40).reply(MESSAGES[0])
    stop = free.text[5:8]
    # The template closes an answer with the stop string, as ChatML writes '<|im_end|>' (read byte by byte).
    closing = ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% if m.role == 'assistant' %}{{ end }}{% else %}</{{ m.role }}>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}",
        "closing",
    )
    chat = Chat(closing, frozenset({TOKENIZER.eos_id}), {"end": stop})
    stops = Conversation(model, TOKENIZER, chat, max_new_tokens=40, stops=[stop])
    turn = stops.reply(MESSAGES[0])
    assert turn.finish == "stop" and turn.text == free.text[: free.text.index(stop)]
    assert stops.messages[-1]["content"] == turn.text
    ids = TOKENIZER.encode(closing.render([*stops.messages, {"role": "user", "content": MESSAGES[1]}], {"end": stop}))
    after = stops.reply(MESSAGES[1])  # (from the state after the answer's tokens, the last one run or not)
    assert after.kept_tokens >= turn.prompt_tokens + len(turn.tokens) - 1
    assert after.tokens == generate(model, ids, max_new_tokens=40, eos_id=TOKENIZER.eos_id)[: len(after.tokens)]
    with pytest.raises(ValueError, match="non-empty"):
        Conversation(model, TOKENIZER, CHAT, stops=[""])


def test_ctrl_c_keeps_the_answer_so_far_as_shown_and_is_raised(model):
    chat = Conversation(model, TOKENIZER, CHAT, max_new_tokens=24)
    shown = []

    def write(piece):
        shown.append(piece)
        if len(shown) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.reply(MESSAGES[0], write=write)
    assert len(shown) == 3 and chat.messages[-1] == {"role": "assistant", "content": "".join(shown)}
    assert chat.reply(MESSAGES[1]).tokens  # (and the conversation goes on from it)


def test_an_error_while_answering_leaves_the_conversation_as_it_was(model, monkeypatch):
    chat = Conversation(model, TOKENIZER, CHAT, max_new_tokens=8)
    chat.reply(MESSAGES[0])
    before = [dict(m) for m in chat.messages]

    def failing(*args, callback, **kwargs):
        callback(0, 65)
        raise RuntimeError("out of memory")

    monkeypatch.setattr("hybridlm.infer.conversation.generate", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        chat.reply(MESSAGES[1])
    assert chat.messages == before and chat.turns == 1


def test_sampled_turn_n_draws_from_seed_plus_n(model):
    chat = Conversation(model, TOKENIZER, CHAT, max_new_tokens=8, temperature=1.0, seed=5)
    for n, text in enumerate(MESSAGES[:2]):
        ids = rendered([*chat.messages, {"role": "user", "content": text}])
        assert chat.reply(text).tokens == generate(
            model, ids, max_new_tokens=8, temperature=1.0, seed=5 + n, eos_id=TOKENIZER.eos_id
        )


def test_a_turn_takes_the_frequency_and_presence_penalties(model):
    """Each answer counts its own tokens for OpenAI's penalties (not the conversation's earlier answers): the
    tokens of ``generate`` over the rendered conversation with those penalties."""
    penalties = dict(frequency_penalty=1.2, presence_penalty=0.6)
    chat = Conversation(model, TOKENIZER, CHAT, max_new_tokens=16, **penalties)
    changed = False
    for text in MESSAGES[:2]:
        ids = rendered([*chat.messages, {"role": "user", "content": text}])
        want = generate(model, ids, max_new_tokens=16, eos_id=TOKENIZER.eos_id, **penalties)
        changed |= want != generate(model, ids, max_new_tokens=16, eos_id=TOKENIZER.eos_id)
        assert chat.reply(text).tokens == want
    assert changed
    with pytest.raises(ValueError, match="presence_penalty must be in"):
        Conversation(model, TOKENIZER, CHAT, presence_penalty=3)
    with pytest.raises(ValueError, match=r"logit_bias: 257 is not a token id \(an integer in \[0, 257\)\)"):
        Conversation(model, TOKENIZER, CHAT, logit_bias={257: 1.0})
    ids = rendered([{"role": "user", "content": MESSAGES[0]}])
    first = generate(model, ids, max_new_tokens=1, eos_id=TOKENIZER.eos_id)[0]
    banned = Conversation(model, TOKENIZER, CHAT, max_new_tokens=8, logit_bias={first: -100.0}).reply(MESSAGES[0])
    assert banned.tokens == generate(model, ids, max_new_tokens=8, eos_id=TOKENIZER.eos_id, logit_bias={first: -100.0})
    assert banned.tokens[0] != first


def test_reset_starts_over_as_a_new_conversation(model):
    chat = Conversation(model, TOKENIZER, CHAT, system="Be brief.", max_new_tokens=16)
    first = [chat.reply(text).tokens for text in MESSAGES[:2]]
    assert chat.system == "Be brief."
    chat.reset()
    assert chat.messages == [] and chat.system is None
    chat.reset("Be brief.")
    assert [chat.reply(text).tokens for text in MESSAGES[:2]] == first


def test_a_chat_without_a_template_and_bad_settings_are_refused(model):
    with pytest.raises(ValueError, match="no chat template"):
        Conversation(model, TOKENIZER, Chat(None))
    with pytest.raises(ValueError, match="max_new_tokens"):
        Conversation(model, TOKENIZER, CHAT, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        Conversation(model, TOKENIZER, CHAT, top_p=0)


def test_speculative_turns_answer_as_plain_turns_with_the_depths_drafting():
    """With the MTP depths drafting, each greedy turn gives the tokens of a plain turn and says how many drafts it
    took; the main model's and the depths' states after an answer serve the next turn (none kept: every turn runs
    whole); sampled turns repeat for a seed."""
    mtp = ascii_model("M[*-]G-/[*-]/[*-]")
    spec = Conversation(mtp, TOKENIZER, CHAT, system="Be brief.", max_new_tokens=24, speculative="mtp")
    whole = Conversation(mtp, TOKENIZER, CHAT, system="Be brief.", max_new_tokens=24, speculative="mtp", kept_states=0)
    plain = Conversation(mtp, TOKENIZER, CHAT, system="Be brief.", max_new_tokens=24, kept_states=0)
    previous = None
    for text in MESSAGES:
        turn, again, expected = spec.reply(text), whole.reply(text), plain.reply(text)
        assert (turn.tokens, turn.text) == (again.tokens, again.text) == (expected.tokens, expected.text)
        assert turn.drafted > 0 and 0 <= turn.accepted <= turn.drafted and expected.drafted == 0
        assert again.kept_tokens == 0 and turn.prompt_tokens == expected.prompt_tokens
        # the positions of the last prompt and answer, all but the answer's last token (not yet run)
        assert turn.kept_tokens == (previous.prompt_tokens + len(previous.tokens) - 1 if previous else 0)
        previous = turn
    sampled = [
        Conversation(
            mtp, TOKENIZER, CHAT, max_new_tokens=16, temperature=0.9, seed=3, speculative="mtp", draft_tokens=1
        )
        for _ in range(2)
    ]
    assert sampled[0].reply(MESSAGES[0]).tokens == sampled[1].reply(MESSAGES[0]).tokens


def test_speculation_needs_mtp_depths_and_no_cuda_graph(model):
    with pytest.raises(ValueError, match="MTP depths"):
        Conversation(model, TOKENIZER, CHAT, speculative="mtp")
    with pytest.raises(ValueError, match="no cuda_graph"):
        Conversation(ascii_model("M/-"), TOKENIZER, CHAT, speculative="mtp", cuda_graph=True)
