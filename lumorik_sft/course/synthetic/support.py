"""The customer-service application's data: a support message in, a policy-correct reply out.

Single-turn: one customer message (order number, product, issue) and one reply that apologises
or acknowledges, gives the next step the returns policy allows for that issue, and names the order
number. The policy is `lumorik_sft.fidelity.SUPPORT_REMEDIES`, the same table the fact checker
reads, so "the right remedy" means one thing in the data and in the evaluation. Multi-turn
conversations need a chat template; a later notebook on chat templates covers them.
"""

from __future__ import annotations

import random

from lumorik_sft.course.synthetic.common import Record, check_size
from lumorik_sft.fidelity import SUPPORT_REMEDIES

SUPPORT_INSTRUCTION = "Reply to the customer message."

_PRODUCTS = (
    "desk lamp",
    "coffee grinder",
    "wireless mouse",
    "electric kettle",
    "bluetooth speaker",
    "hair dryer",
    "fitness watch",
    "air purifier",
)

# issue -> three ways a customer says it ({product} is theirs)
_MESSAGES = {
    "damaged on arrival": (
        "My {product} arrived broken. What can you do?",
        "The {product} came today but it is cracked.",
        "The box was crushed and the {product} inside is damaged.",
    ),
    "wrong item": (
        "I ordered the {product} but received something else.",
        "You sent me the wrong item instead of my {product}.",
        "The parcel had someone else's order in it, not my {product}.",
    ),
    "not delivered": (
        "My {product} has not arrived and the tracking has not moved for a week.",
        "Where is my {product}? It was due last week.",
        "The {product} never arrived.",
    ),
    "stopped working": (
        "My {product} stopped working after two months.",
        "The {product} worked at first but now it does not turn on.",
        "After a few weeks my {product} broke during normal use.",
    ),
    "changed mind": (
        "I no longer need the {product}. Can I send it back?",
        "The {product} is not what I expected and I would like my money back.",
        "I changed my mind about the {product}.",
    ),
    "charged twice": (
        "I was charged twice for my {product}.",
        "My card shows two payments for the {product}.",
        "You took the payment for my {product} two times.",
    ),
}

# issue -> (acknowledgement, next step); the next step names SUPPORT_REMEDIES[issue] word for word
_REPLIES = {
    "damaged on arrival": (
        "I am sorry your {product} arrived damaged.",
        "We will send a {remedy} for order {order} today; you do not need to return the damaged one.",
    ),
    "wrong item": (
        "I am sorry we sent the wrong item instead of your {product}.",
        "We will ship the {remedy} for order {order} today, with a prepaid label for the other one.",
    ),
    "not delivered": (
        "I am sorry your {product} has not arrived.",
        "We have opened a {remedy} for order {order}; if it is not found in five days, we will send "
        "a new one.",
    ),
    "stopped working": (
        "I am sorry your {product} stopped working.",
        "It is under warranty, so we will arrange a {remedy} for order {order} at no cost.",
    ),
    "changed mind": (
        "No problem, you can return the {product}.",
        "Send it back within 30 days and we will give a {remedy} for order {order}.",
    ),
    "charged twice": (
        "I am sorry you were charged twice for your {product}.",
        "We have refunded the {remedy} on order {order}; it will show within five working days.",
    ),
}

_ORDER_NUMBERS = range(10_000, 100_000)  # five digits, each used once per data set


def support_replies(n: int = 200, seed: int = 0) -> list[Record]:
    """Synthetic support messages with their policy-correct replies, seeded and distinct.

    The reply follows from the prompt: product and order number are copied, the remedy comes
    from the issue through :data:`lumorik_sft.fidelity.SUPPORT_REMEDIES`, whatever the wording
    of the message. 144 messages (8 products x 6 issues x 3 phrasings) each with its own order
    number; order numbers are never reused within one set.
    """
    check_size("support_replies", n, len(_ORDER_NUMBERS))
    rng = random.Random(seed)
    orders = rng.sample(_ORDER_NUMBERS, n)
    records = []
    for order in orders:
        product, issue = rng.choice(_PRODUCTS), rng.choice(sorted(_MESSAGES))
        message = rng.choice(_MESSAGES[issue]).format(product=product)
        records.append(support_record(str(order), product, issue, message))
    return records


def support_record(order: str, product: str, issue: str, message: str) -> Record:
    """One prompt/reply pair; the reply states SUPPORT_REMEDIES[issue], the policy's next step."""
    slots = {"product": product, "order": order, "remedy": SUPPORT_REMEDIES[issue]}
    acknowledge, next_step = (s.format(**slots) for s in _REPLIES[issue])
    prompt = f"{SUPPORT_INSTRUCTION}\nOrder: {order}\nProduct: {product}\nIssue: {issue}\nMessage: {message}"
    return {"prompt": prompt, "completion": f"{acknowledge} {next_step}"}
