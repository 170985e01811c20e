"""The customer-support chats and the fact-use check: the last reply must use facts given earlier."""

from __future__ import annotations

import doctest
import json
import re
import statistics

import pytest

from lumorik_sft import fidelity
from lumorik_sft.conversations import validate_messages
from lumorik_sft.course.synthetic import SYNTHETIC_NOTICE, support_chat
from lumorik_sft.course.synthetic.support_chat import (
    SUPPORT_PRODUCTS,
    TOPICS,
    dialogue_facts,
    split_last_reply,
    support_dialogues,
)
from lumorik_sft.fidelity import SUPPORT_REMEDIES, fact_use_rate, fact_use_report, history_fact_use

TOKEN_BUDGET = 200  # the model reads 256 tokens; leave room for a longer reply than the reference
TURN_OVERHEAD = 4  # role token, newline, end-of-turn token, newline: as the chat template renders


@pytest.fixture(scope="module")
def chats() -> list[dict]:
    return support_dialogues(600, seed=0)


def _exchanges(messages: list[dict]) -> int:
    return sum(m["role"] == "user" for m in messages)


# ---------------------------------------------------------------------------------- the data


def test_chats_are_seeded_distinct_and_marked_synthetic(chats: list[dict]) -> None:
    assert support_dialogues(600, seed=0) == chats and support_dialogues(600, seed=1) != chats
    assert len({json.dumps(c, sort_keys=True) for c in chats}) == 600
    orders = [dialogue_facts(c)["order"] for c in chats]
    assert len(set(orders)) == 600  # an order number is never reused within a set
    assert "SYNTHETIC TEACHING DATA" in support_chat.__doc__ and "SYNTHETIC" in SYNTHETIC_NOTICE
    with pytest.raises(ValueError, match="support_dialogues has 90,000 distinct records"):
        support_dialogues(90_001)


def test_the_wording_varies_so_no_chat_can_be_learned_by_heart(chats: list[dict]) -> None:
    """With the facts masked, the 600 chats still take hundreds of shapes, over every topic."""
    shapes = set()
    for chat in chats:
        facts = dialogue_facts(chat)
        text = json.dumps(chat["messages"]).replace(facts["order"], "#").replace(facts["product"], "@")
        shapes.add(text)
    assert len(shapes) > 400
    assert {dialogue_facts(c)["topic"] for c in chats} == set(TOPICS)
    assert {dialogue_facts(c)["area"] for c in chats} == {"orders", "returns", "delivery", "accounts"}
    assert {_exchanges(c["messages"]) for c in chats} == {2, 3, 4}
    assert {c["messages"][0]["role"] for c in chats} == {"system", "user"}


def test_every_chat_has_the_chat_shape(chats: list[dict]) -> None:
    """Optional system first, then user/assistant alternating, ending with the assistant."""
    for chat in chats:
        assert set(chat) == {"messages"}
        assert validate_messages(chat["messages"]) == chat["messages"]  # raises naming the bad turn
        assert all(m["content"].strip() == m["content"] != "" for m in chat["messages"]), chat
        assert 2 <= _exchanges(chat["messages"]) <= 4


def test_facts_come_early_and_the_last_question_does_not_repeat_them(chats: list[dict]) -> None:
    for chat in chats:
        facts = dialogue_facts(chat)
        users = [m["content"] for m in chat["messages"] if m["role"] == "user"]
        assert any(facts["order"] in u and facts["product"] in u for u in users[:2]), users
        assert not re.search(r"\d{5}", users[-1]) and not any(p in users[-1] for p in SUPPORT_PRODUCTS)


def test_the_last_reply_names_the_facts_the_history_gives(chats: list[dict]) -> None:
    repeats = set()
    for chat in chats:
        facts, last = dialogue_facts(chat), chat["messages"][-1]["content"]
        named = (facts["order"] in last, facts["product"] in last)
        assert any(named), last  # every last reply needs the history
        repeats.add(named)
        assert re.findall(r"\d{5}", last) in ([], [facts["order"]]), last  # no other order number
        assert [p for p in SUPPORT_PRODUCTS if p in last] in ([], [facts["product"]]), last
        if facts["topic"] in SUPPORT_REMEDIES:
            assert facts["remedy"] == SUPPORT_REMEDIES[facts["topic"]] and facts["remedy"] in last, last
            others = set(SUPPORT_REMEDIES.values()) - {facts["remedy"]}
            assert not any(remedy in last for remedy in others), last
        else:
            assert "remedy" not in facts
    assert repeats == {(True, True), (True, False), (False, True)}  # order, product, or both


def test_dialogue_facts_refuses_a_chat_it_did_not_write() -> None:
    chat = {"messages": [{"role": "user", "content": "Hello, order 12345 for a desk lamp."}]}
    chat["messages"].append({"role": "assistant", "content": "Hi."})
    with pytest.raises(ValueError, match="no topic opens with"):
        dialogue_facts(chat)
    with pytest.raises(ValueError, match="one order number and one product"):
        dialogue_facts({"messages": [{"role": "user", "content": "Hi."}, chat["messages"][1]]})
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        split_last_reply({"messages": chat["messages"][:1]})


def test_every_chat_fits_the_token_budget_of_the_embedded_model(chats: list[dict]) -> None:
    from transformers import AutoTokenizer

    from lumorik_sft.models import EMBEDDED_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    lengths = [
        sum(len(tokenizer(m["content"])["input_ids"]) + TURN_OVERHEAD for m in chat["messages"])
        for chat in chats
    ]
    assert max(lengths) < TOKEN_BUDGET, max(lengths)
    assert 80 < statistics.median(lengths) < 150  # several turns, not a one-liner


# ------------------------------------------------------------------------------- fact use


def _split(chats: list[dict]) -> tuple[list[list[dict]], list[str]]:
    histories, references = zip(*(split_last_reply(c) for c in chats), strict=True)
    return list(histories), list(references)


HISTORY = [
    {"role": "system", "content": "You help the customers of an online shop."},
    {"role": "user", "content": "My lamp is broken."},
    {"role": "assistant", "content": "What is your order number?"},
    {"role": "user", "content": "It is 48213, a desk lamp."},
    {"role": "assistant", "content": "I am sorry to hear that."},
    {"role": "user", "content": "What happens next?"},
]
REFERENCE = "We will send a free replacement of the desk lamp for order 48213 today."


def _use(candidate: str, reference: str = REFERENCE, **kwargs) -> fidelity.FactUse:
    return history_fact_use(HISTORY, candidate, reference, products=SUPPORT_PRODUCTS, **kwargs)


def test_fact_use_of_constructed_replies() -> None:
    assert _use(REFERENCE) == fidelity.FactUse(("order", "product"), ("order", "product"), ())
    wrong_order = _use(REFERENCE.replace("48213", "48210"))
    assert wrong_order.right == ("product",) and wrong_order.wrong == ("order",)
    both = _use(REFERENCE + " Or was it order 51234?")  # the right number beside a wrong one
    assert both.wrong == ("order",)
    foreign = _use("We will send a new hair dryer for order 48213.")
    assert foreign.right == ("order",) and foreign.wrong == ("product",)
    generic = _use("I am sorry to hear that.")
    assert generic.right == () and generic.wrong == () and generic.missing == ("order", "product")
    # what the reference does not repeat is not counted, whatever the candidate says
    only_order = _use("A new one ships today for order 48213.", reference="Order 48213 ships today.")
    assert only_order.expected == ("order",) and only_order.right == ("order",)
    assert _use("Sorry.", reference="We will sort it out.").expected == ()
    # the reference's own extra number (not from the history) is not foreign
    assert _use("Order 48213, trace 55555.", reference="Order 48213, trace 55555.").right == ("order",)


def test_fact_use_matches_whole_words_and_needs_every_repeated_value() -> None:
    history = [{"role": "user", "content": "Orders 48213 and 51234, a desk lamp."}]
    reference = "Orders 48213 and 51234 ship today with your desk lamp."
    products = ["lamp", "desk lamp"]  # "desk lamp" does not also name the product "lamp"
    use = history_fact_use(
        history, "Order 48213 ships today with your Desk-Lamp.", reference, products=products
    )
    assert use.expected == ("order", "product") and use.right == ("product",) and use.missing == ("order",)
    assert history_fact_use(history, "A new lamp ships.", reference, products=products).wrong == ("product",)


def test_fact_use_reads_only_user_turns_and_explains_bad_calls() -> None:
    history = [
        {"role": "user", "content": "My lamp broke."},
        {"role": "assistant", "content": "Is it 48213?"},
    ]
    assert history_fact_use(history, "x", "Order 48213.", keys=("order",)).expected == ()
    with pytest.raises(ValueError, match="pass products="):
        history_fact_use(HISTORY, REFERENCE, REFERENCE)
    with pytest.raises(ValueError, match="unknown fact key 'colour'"):
        _use(REFERENCE, keys=("colour",))
    with pytest.raises(ValueError, match="one candidate and one reference per history"):
        fact_use_report([HISTORY], REFERENCE, [REFERENCE], products=SUPPORT_PRODUCTS)
    with pytest.raises(ValueError, match="nothing to check"):
        fact_use_rate([HISTORY], ["Sorry."], ["Sorry."], products=SUPPORT_PRODUCTS)
    failures, _ = doctest.testmod(fidelity, verbose=False)
    assert failures == 0


def test_on_the_chats_the_reference_scores_full_and_other_chats_replies_do_not(chats: list[dict]) -> None:
    histories, references = _split(chats)
    report = fact_use_report(histories, references, references, products=SUPPORT_PRODUCTS)
    assert report.summary()["fact_use"] == 1.0 and report.summary()["wrong"] == 0.0
    assert all(use.right == use.expected != () for use in report.per_chat)  # every chat is checked
    assert fact_use_rate(histories, references, references, products=SUPPORT_PRODUCTS) == 1.0
    # a model that ignores the history: the right kind of reply, from another conversation
    shifted = references[1:] + references[:1]
    ignored = fact_use_report(histories, shifted, references, products=SUPPORT_PRODUCTS)
    assert ignored.rate("order") == 0.0 and ignored.rate("product") < 0.2 and ignored.rate() < 0.2
    assert ignored.wrong_rate() > 0.5  # mostly another customer's order or product, named
    generic = ["I am sorry to hear that."] * len(references)
    assert fact_use_rate(histories, generic, references, products=SUPPORT_PRODUCTS) == 0.0
