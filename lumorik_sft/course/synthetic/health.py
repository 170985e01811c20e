"""The healthcare application's data: general-information Q&A on ten topics, never dosing."""

from __future__ import annotations

import random

from lumorik_sft.course.synthetic.common import Record

# ---------------------------------------------------------------------------------------- health Q&A

HEALTH_SAFETY_NOTE = "This is general information, not medical advice."

# topic -> answers per question type
_HEALTH_TOPICS: dict[str, dict[str, str]] = {
    "the common cold": {
        "symptoms": "a runny or blocked nose, sneezing, a sore throat and a mild cough",
        "home": "rest, drink plenty of fluids and keep warm; symptoms usually improve within "
        "a week to ten days",
        "doctor": "symptoms last more than three weeks, breathing becomes difficult or a high "
        "temperature does not settle",
        "prevent": "wash your hands often, avoid touching your face and keep shared surfaces clean",
    },
    "seasonal allergies": {
        "symptoms": "sneezing, itchy or watery eyes and a runny nose when pollen levels are high",
        "home": "keep windows closed on high-pollen days, shower after being outdoors and ask a "
        "pharmacist about suitable antihistamines",
        "doctor": "symptoms disturb sleep or daily life, or you notice wheezing or chest tightness",
        "prevent": "check pollen forecasts, wear wraparound sunglasses outside and dry laundry indoors",
    },
    "a minor burn": {
        "symptoms": "red, painful skin and sometimes small blisters over a small area",
        "home": "cool the burn under cool running water for twenty minutes, remove jewellery nearby "
        "and cover it loosely with cling film",
        "doctor": "the burn is larger than your hand, on the face, hands or genitals, or the skin "
        "looks white or charred",
        "prevent": "turn pan handles inwards, test bath water before getting in and keep hot "
        "drinks away from children",
    },
    "a sprained ankle": {
        "symptoms": "pain, swelling and bruising around the ankle and difficulty putting weight on it",
        "home": "rest it, apply a cold pack wrapped in a towel, and keep the foot raised when you can",
        "doctor": "you cannot stand on the foot, the ankle looks misshapen or the pain does not "
        "improve after a few days",
        "prevent": "warm up before exercise, wear supportive shoes and take care on uneven ground",
    },
    "dehydration": {
        "symptoms": "thirst, dark yellow urine, dizziness, tiredness and a dry mouth",
        "home": "sip water or diluted squash regularly, and use oral rehydration solutions "
        "after vomiting or diarrhoea",
        "doctor": "you feel confused, cannot keep fluids down, or have not passed urine for many hours",
        "prevent": "drink regularly through the day, especially in hot weather and during exercise",
    },
    "trouble sleeping": {
        "symptoms": "difficulty falling asleep, waking often in the night and feeling tired during the day",
        "home": "keep regular sleep times, avoid screens before bed and limit caffeine after midday",
        "doctor": "poor sleep lasts for months or seriously affects your mood or daily life",
        "prevent": "keep the bedroom dark and cool, and get some daylight and exercise each day",
    },
    "heartburn": {
        "symptoms": "a burning feeling in the chest, often after eating, and a sour taste in the mouth",
        "home": "eat smaller meals, avoid eating late at night and raise the head of your bed slightly",
        "doctor": "heartburn happens most days, you have trouble swallowing or you are losing "
        "weight without trying",
        "prevent": "notice which foods trigger it, cut down on alcohol and avoid lying down after meals",
    },
    "a tension headache": {
        "symptoms": "a dull ache or a feeling of pressure on both sides of the head",
        "home": "rest, drink water, relax your neck and shoulders and take regular screen breaks",
        "doctor": "the headache is sudden and severe, follows a head injury or comes with "
        "a stiff neck or fever",
        "prevent": "manage stress, keep a good posture, sleep regularly and stay hydrated",
    },
    "sunburn": {
        "symptoms": "hot, red, sore skin that may peel or blister a few days later",
        "home": "get out of the sun, cool the skin with a cool shower and use an aloe vera "
        "or after-sun cream",
        "doctor": "the skin blisters over a large area, or you feel feverish, dizzy or sick",
        "prevent": "use a high-factor sunscreen, wear a hat and stay in the shade around midday",
    },
    "a mild fever": {
        "symptoms": "feeling hot or shivery, a raised temperature, aches and tiredness",
        "home": "rest, drink plenty of fluids and wear light clothing",
        "doctor": "the fever lasts more than a few days, is very high, or comes with a rash, "
        "confusion or breathing problems",
        "prevent": "wash hands regularly and keep up to date with recommended vaccinations",
    },
}

_HEALTH_QUESTIONS = {
    "symptoms": (
        "What are the common symptoms of {topic}?",
        "How can I tell if I have {topic}?",
        "Which signs usually come with {topic}?",
    ),
    "home": (
        "How can I ease {topic} at home?",
        "What self-care helps with {topic}?",
        "What can I do at home about {topic}?",
    ),
    "doctor": (
        "When should I see a doctor about {topic}?",
        "When is {topic} a reason to get medical help?",
        "How do I know if {topic} needs a doctor?",
    ),
    "prevent": (
        "How can I prevent {topic}?",
        "What lowers the chance of getting {topic}?",
        "How do I avoid {topic}?",
    ),
}

_HEALTH_ANSWER = {
    "symptoms": "Common signs of {topic} include {text}.",
    "home": "For {topic}, it usually helps to {text}.",
    "doctor": "See a doctor about {topic} if {text}.",
    "prevent": "To lower the chance of {topic}, {text}.",
}

# person the question is about -> extra advice sentence in the answer
_HEALTH_PEOPLE = {
    "an adult": "",
    "a child": "For a child, contact a doctor or nurse sooner, especially if they are very young "
    "or seem unusually unwell. ",
    "an older adult": "For older adults, seek advice earlier, especially with other health "
    "conditions or regular medicines. ",
}


def health_qa(n: int = 200, seed: int = 0) -> list[Record]:
    """Synthetic health-information Q&A: the answer follows from topic, question type and person.

    General information only, never dosing; every answer ends with :data:`HEALTH_SAFETY_NOTE`.
    360 distinct questions exist (10 topics x 4 question types x 3 phrasings x 3 people).
    """
    combos = [
        (t, q, i, p)
        for t in _HEALTH_TOPICS
        for q in _HEALTH_QUESTIONS
        for i in range(3)
        for p in _HEALTH_PEOPLE
    ]
    if n > len(combos):
        raise ValueError(f"health_qa has {len(combos)} distinct questions; asked for n={n}")
    records = []
    for topic, qtype, phrasing, person in random.Random(seed).sample(combos, n):
        question = _HEALTH_QUESTIONS[qtype][phrasing].format(topic=topic)
        answer = _HEALTH_ANSWER[qtype].format(topic=topic, text=_HEALTH_TOPICS[topic][qtype])
        records.append(
            {
                "prompt": f"Answer the health question.\nAsking about: {person}\nQuestion: {question}",
                "completion": f"{answer} {_HEALTH_PEOPLE[person]}{HEALTH_SAFETY_NOTE}",
            }
        )
    return records
