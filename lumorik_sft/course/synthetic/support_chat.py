"""Customer-support chats in which the last reply must use facts the customer gave earlier.

SYNTHETIC TEACHING DATA: every conversation is generated from templates; the shop, its orders
and its customers are made up (see ``SYNTHETIC_NOTICE``).

A record is ``{"messages": [...]}``: an optional system message, then 2-4 user/assistant
exchanges, ending with the assistant. Topics cover orders, returns, delivery and accounts. The
customer gives the order number and the product in their first message, or in their second when
the assistant asks for them; the last user message ("What happens next?") never repeats them, yet
the last reply names the order number, the product or both. A model that ignores the history
cannot get them right, which `lumorik_sft.fidelity.fact_use_report` measures. Problems with a
policy remedy (damaged, wrong item, changed mind, not delivered, charged twice) name the remedy
of `lumorik_sft.fidelity.SUPPORT_REMEDIES`, as the single-turn set does. As in the other sets,
the facts live in the text: :func:`dialogue_facts` reads them back, so they survive a JSONL file.

    python -c "from lumorik_sft.course.synthetic.support_chat import support_dialogues as d; print(d(1)[0])"
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lumorik_sft import conversations
from lumorik_sft.course.synthetic.common import check_size
from lumorik_sft.course.synthetic.support import _PRODUCTS
from lumorik_sft.fidelity import SUPPORT_REMEDIES, history_facts

ChatRecord = dict[str, list[dict[str, str]]]

SUPPORT_PRODUCTS: tuple[str, ...] = _PRODUCTS  # the single-turn set's products: one catalogue
SYSTEM_PROMPTS = (
    "You help the customers of an online shop.",
    "You are the support assistant of an online shop.",
)
_ORDER_NUMBERS = range(10_000, 100_000)  # five digits, each used once per data set

# How the assistant asks for the order, and how the customer gives it (with the product).
_ASK = (
    "I can help with that. What is your order number?",
    "Sure. What is the order number?",
    "Let me check. What is your order number?",
)
_ASK_ACCOUNT = (
    "I can help. What is your order number, so I can find your account?",
    "Sure. What is your last order number? Then I can find your account.",
)
_GIVE = (
    "It is {order}, {a_product}.",
    "Order {order}, for {a_product}.",
    "The number is {order}. It is {a_product}.",
    "It is order {order}. I bought {a_product}.",
)


@dataclass(frozen=True)
class Topic:
    """One reason to contact support, with several wordings of each turn.

    ``questions`` are optional (assistant question, customer answer) pairs that lengthen a chat
    without giving a fact; ``closing`` is the customer's last message and never names a fact;
    ``final`` is the last reply and names ``{order}``, ``{product}`` or both (and ``{remedy}``).
    """

    area: str
    opening: tuple[str, ...]
    opening_with_facts: tuple[str, ...]
    questions: tuple[tuple[str, str], ...]
    step: tuple[str, ...]
    closing: tuple[str, ...]
    final: tuple[str, ...]
    ask: tuple[str, ...] = _ASK


TOPICS: dict[str, Topic] = {
    "order status": Topic(
        area="orders",
        opening=("Where is my order?", "Has my order shipped yet?", "I want to know where my order is."),
        opening_with_facts=(
            "Where is my {product}? The order number is {order}.",
            "Has order {order} shipped yet? It is {a_product}.",
        ),
        questions=(
            ("Did you get a shipping email?", "No, I did not."),
            ("Did you order it this week?", "Yes, on Monday."),
        ),
        step=("It left our store yesterday.", "It is packed and ships today.", "I can see it is on the way."),
        closing=("When will it arrive?", "How long will it take?", "When can I expect it?"),
        final=(
            "Your {product} should arrive in two or three days.",
            "Order {order} should arrive in two or three days.",
            "The {product} from order {order} will arrive within three days.",
        ),
    ),
    "change address": Topic(
        area="orders",
        opening=("I need to change my delivery address.", "Can I send my order to a new address?"),
        opening_with_facts=(
            "Please change the address for order {order}, {a_product}.",
            "Can order {order}, {a_product}, go to my new address?",
        ),
        questions=(
            ("What is the new address?", "It is 4 Park Road."),
            ("What is the new address?", "Please use 9 Mill Lane."),
        ),
        step=("Done. I have changed the address.", "I have updated the address for you."),
        closing=("Will it still come on time?", "Will that delay it?"),
        final=(
            "No. Order {order} will reach your new address on time.",
            "It will not. Your {product} will come to the new address on time.",
            "The {product} from order {order} will still arrive on time.",
        ),
    ),
    "damaged on arrival": Topic(
        area="returns",
        opening=(
            "My parcel came today but the item is broken.",
            "The item I got is damaged.",
            "My order arrived broken.",
        ),
        opening_with_facts=(
            "My {product} from order {order} arrived broken.",
            "Order {order} came today and the {product} is cracked.",
        ),
        questions=(
            ("Was the box damaged too?", "Yes, it was crushed."),
            ("Was the box damaged too?", "No, the box looked fine."),
            ("Does it work at all?", "No, it does not."),
        ),
        step=("I am sorry about that. We will make it right.", "I am sorry to hear that."),
        closing=("What happens next?", "What can you do?", "How do we fix this?"),
        final=(
            "We will send a {remedy} for order {order} today. You can keep the broken one.",
            "A {remedy} for your {product} ships today. You do not need to return it.",
            "We will ship a {remedy} of the {product} from order {order} today.",
        ),
    ),
    "wrong item": Topic(
        area="returns",
        opening=(
            "You sent me the wrong item.",
            "The parcel had the wrong thing in it.",
            "I got something I did not order.",
        ),
        opening_with_facts=(
            "I ordered {a_product} in order {order}, but got something else.",
            "Order {order} should be {a_product}, but it is not.",
        ),
        questions=(
            ("What did you get instead?", "A pair of socks."),
            ("What did you get instead?", "A book."),
            ("Is the parcel open?", "Yes, I opened it."),
        ),
        step=("I am sorry we sent the wrong item.", "Sorry about that mix-up."),
        closing=("What happens next?", "Can you fix it?", "What should I do?"),
        final=(
            "We will ship the {remedy} for order {order} today, with a label for the other one.",
            "The {remedy}, your {product}, ships today. Please send the other one back with our label.",
            "We will send the {remedy} for order {order}, the {product}, today.",
        ),
    ),
    "changed mind": Topic(
        area="returns",
        opening=(
            "I want to return something.",
            "I changed my mind about my order.",
            "Can I send my order back?",
        ),
        opening_with_facts=(
            "I no longer need the {product} from order {order}.",
            "Can I return the {product}? The order is {order}.",
        ),
        questions=(
            ("Is it still in its box?", "Yes, I never opened it."),
            ("Have you used it?", "No, not at all."),
        ),
        step=("No problem, you can return it.", "Sure, returns are free within 30 days."),
        closing=("How do I get my money back?", "What happens next?", "When do I get my money?"),
        final=(
            "Send the {product} back within 30 days and we will give a {remedy} for order {order}.",
            "Once the {product} is back with us, you get a {remedy}.",
            "We will give a {remedy} for order {order} when it is back with us.",
        ),
    ),
    "late delivery": Topic(
        area="delivery",
        opening=("My order is late.", "My parcel was due two days ago.", "My order should be here by now."),
        opening_with_facts=(
            "Order {order} is late. It is {a_product}.",
            "My {product} was due on Monday. The order is {order}.",
        ),
        questions=(
            ("Did you get an email about a delay?", "No, nothing."),
            ("When was it due?", "Last Friday."),
        ),
        step=(
            "I am sorry for the wait. The carrier is behind this week.",
            "Sorry about that. There is a delay at the depot.",
        ),
        closing=("When will it come?", "How long do I have to wait?", "Is it still coming?"),
        final=(
            "Your {product} is on its way and will arrive by Friday.",
            "Order {order} is on its way and will come by Friday.",
            "The {product} from order {order} will arrive in two days.",
        ),
    ),
    "not delivered": Topic(
        area="delivery",
        opening=(
            "The tracking says delivered, but I have nothing.",
            "My parcel shows as delivered, but it is not here.",
        ),
        opening_with_facts=(
            "Order {order} says delivered, but my {product} is not here.",
            "I never got my {product}. The order is {order}.",
        ),
        questions=(
            ("Did you ask your neighbours?", "Yes, they do not have it."),
            ("Could it be in a safe place?", "No, I looked everywhere."),
        ),
        step=("I am sorry. Let me look into it.", "Sorry about that. We will find it."),
        closing=("What happens now?", "What can you do?", "Will I get it?"),
        final=(
            "We have opened a {remedy} for order {order}. If it is not found in five days, we send another.",
            "I have started a {remedy} for your {product}. If it is lost, we send a new one.",
            "A {remedy} for order {order} is open. You will hear from us in five days.",
        ),
    ),
    "password reset": Topic(
        area="accounts",
        opening=("I cannot log in to my account.", "I forgot my password.", "My password does not work."),
        opening_with_facts=(
            "I cannot log in to check order {order}, {a_product}.",
            "I forgot my password. My last order is {order}, {a_product}.",
        ),
        questions=(
            ("Did the reset link arrive?", "Yes, I am in now."),
            ("Can you log in now?", "Yes, thank you."),
        ),
        step=("I have sent a reset link to your email.", "A reset link is on its way to your email."),
        closing=("Has my order shipped?", "Can you check my order too?", "Is my order on its way?"),
        final=(
            "Yes. Order {order} shipped today.",
            "Your {product} shipped today.",
            "Yes, the {product} from order {order} shipped today.",
        ),
        ask=_ASK_ACCOUNT,
    ),
    "email change": Topic(
        area="accounts",
        opening=("I want to change my email address.", "Please update the email on my account."),
        opening_with_facts=(
            "Please change my email. My last order was {order}, {a_product}.",
            "I have a new email. My order is {order}, {a_product}.",
        ),
        questions=(
            ("Should we use it for all emails?", "Yes, please."),
            ("Is the old email still yours?", "No, I closed it."),
        ),
        step=("Done. Your email is changed.", "I have updated your email."),
        closing=("Will I still get news about my order?", "Will my order emails go there too?"),
        final=(
            "Yes. Updates for order {order} will go to your new email.",
            "Yes, news about your {product} will go to the new email.",
            "Yes. Emails about order {order}, the {product}, go to the new email.",
        ),
        ask=_ASK_ACCOUNT,
    ),
    "charged twice": Topic(
        area="accounts",
        opening=("I was charged twice.", "My card shows two payments.", "You took my money two times."),
        opening_with_facts=(
            "I was charged twice for order {order}, {a_product}.",
            "My card shows two payments for my {product}, order {order}.",
        ),
        questions=(
            ("Are both payments the same?", "Yes, they are."),
            ("Did you place the order twice?", "No, only once."),
        ),
        step=("I am sorry about that. I see the second payment.", "Sorry for the trouble. Let me fix that."),
        closing=("When do I get my money back?", "Can you fix it?", "What happens next?"),
        final=(
            "We have refunded the {remedy} on order {order}. It will show within five days.",
            "The {remedy} for your {product} is refunded. It will show in five days.",
            "We refunded the {remedy} for order {order}, your {product}.",
        ),
        ask=_ASK_ACCOUNT,
    ),
}


def support_dialogues(n: int = 300, seed: int = 0) -> list[ChatRecord]:
    """Seeded, distinct support chats; each has its own order number, never reused in a set.

    Topic, product, wording and shape (system message or not, order given at once or on the
    assistant's request, an extra question or not) are drawn independently, so no conversation
    can be learned by heart: only copying the facts from the history gets the last reply right.
    """
    check_size("support_dialogues", n, len(_ORDER_NUMBERS))
    rng = random.Random(seed)
    return [_dialogue(rng, str(order)) for order in rng.sample(_ORDER_NUMBERS, n)]


def _dialogue(rng: random.Random, order: str) -> ChatRecord:
    """One chat: facts at once or when asked, an optional question, then the closing exchange."""
    topic_name = rng.choice(sorted(TOPICS))
    topic = TOPICS[topic_name]
    slots = _slots(order, rng.choice(SUPPORT_PRODUCTS), topic_name)
    if rng.random() < 0.5:  # the customer gives the facts in the first message
        turns = [rng.choice(topic.opening_with_facts)]
    else:  # the assistant has to ask for them
        turns = [rng.choice(topic.opening), rng.choice(topic.ask), rng.choice(_GIVE)]
    if rng.random() < 0.5:
        turns += rng.choice(topic.questions)
    turns += [rng.choice(topic.step), rng.choice(topic.closing), rng.choice(topic.final)]
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    for i, turn in enumerate(turns):
        messages.append({"role": ("user", "assistant")[i % 2], "content": turn.format(**slots)})
    return {"messages": messages}


def _slots(order: str, product: str, topic: str) -> dict[str, str]:
    """What the templates fill in: "an air purifier", not "a air purifier"."""
    article = "an" if product[0] in "aeiou" else "a"
    remedy = SUPPORT_REMEDIES.get(topic, "")
    return {"order": order, "product": product, "a_product": f"{article} {product}", "remedy": remedy}


def dialogue_facts(record: Mapping[str, Any]) -> dict[str, str]:
    """The facts of one chat, read back from its text: order, product, area, topic, remedy.

    ``remedy`` is there only for topics the policy gives one (SUPPORT_REMEDIES). Raises
    ValueError for a chat these templates did not write.
    """
    messages = record["messages"]
    said = history_facts(messages[:-1], SUPPORT_PRODUCTS)
    if len(said["order"]) != 1 or len(said["product"]) != 1:
        raise ValueError(f"not a course support chat (one order number and one product expected): {said}")
    facts = {"order": min(said["order"]), "product": min(said["product"])}
    first = next(m["content"] for m in messages if m["role"] == "user")
    topic = _topic_of(first, facts)
    facts |= {"area": TOPICS[topic].area, "topic": topic}
    if topic in SUPPORT_REMEDIES:
        facts["remedy"] = SUPPORT_REMEDIES[topic]
    return facts


def _topic_of(first_message: str, facts: Mapping[str, str]) -> str:
    """The topic whose opening wording is ``first_message`` (with this chat's facts filled in)."""
    for name, topic in TOPICS.items():
        slots = _slots(facts["order"], facts["product"], name)
        if any(t.format(**slots) == first_message for t in topic.opening + topic.opening_with_facts):
            return name
    raise ValueError(f"not a course support chat: no topic opens with {first_message!r}")


def split_last_reply(record: Mapping[str, Sequence[Mapping[str, str]]]) -> tuple[list[dict[str, str]], str]:
    """(history, last reply): what a model sees, and the reference it is compared with."""
    return conversations.split_last_reply(record["messages"])
