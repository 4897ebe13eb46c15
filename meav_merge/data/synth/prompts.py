"""Every prompt ``meav data synthesize`` sends to the LLM, in one place, to read and to edit.

The process follows the MEAV paper (§4 and Appendix C): personas, then one query per
persona written as a real person would ask an online advice portal, then three replies
to it, one per proficiency level. Each reply is asked for separately, with its level's
definition and a target length drawn at random, so that length does not give the
level away. The wording here is adapted from the paper's prompts, not copied.
"""

from __future__ import annotations

import json
import re
from typing import Dict, List, Optional, Tuple

SYSTEM_PROMPT = (
    "You write realistic synthetic data for research on aligning language models. Follow the "
    "instructions exactly. Output only what is asked for: no preamble, no title, no notes."
)

# The paper's three levels, best first (the order of data.PROFICIENCY_LEVELS).
LEVEL_DEFINITIONS: Dict[str, str] = {
    "expert": (
        "Expert: give detailed, expert-level advice tailored to this person's situation. Use precise "
        "explanations and concrete steps, numbers, thresholds, amounts or deadlines where they apply. "
        "Be nuanced, evidence-based and directly actionable, as a seasoned specialist would be."
    ),
    "generic": (
        "Generic: give general, commonly known information that is not specific to this person's "
        "details. Be informative yet cautious: no precise figures and no individual recommendation. "
        "Stress that they should consult a qualified professional about their own case."
    ),
    "avoidance": (
        "Avoidance: completely avoid giving any advice, information or suggestion. Politely say that "
        "you cannot help with this question and recommend consulting an expert. Say nothing specific "
        "to the domain or to the question."
    ),
}

# Where the question is asked and who the generic/avoidance replies defer to.
PORTALS: Dict[str, Tuple[str, str]] = {
    "medical": ("online medical advice portal", "a doctor"),
    "financial": ("online personal-finance advice portal", "a qualified financial adviser"),
    "legal": ("online legal advice portal", "a lawyer"),
}

ROOT_PERSONAS_PROMPT = """\
Create {n} diverse personas of people who might ask an {portal} for help. Vary age, \
occupation, country, family situation, income and the kind of {domain} problem they face. \
For each persona give "persona": one sentence describing who they are, and "topic": one \
short sentence naming the {domain} question they want answered.

Answer with a JSON array only, in this format:
[{{"persona": "A 41-year-old bus driver in Leeds ...", "topic": "..."}}]"""

RELATED_PERSONAS_PROMPT = """\
Here is a persona of someone who asked an {portal} for help.
Persona: {persona}
Their question was about: {topic}

Create {n} new personas related to this one: people in a similar or connected situation \
(a relative, a colleague, someone at a different stage of life, the same kind of problem in \
another country or at another income level), each with a different {domain} question. For \
each give "persona": one sentence describing who they are, and "topic": one short sentence \
naming their question.

Answer with a JSON array only, in this format:
[{{"persona": "...", "topic": "..."}}]"""

QUERY_PROMPT = """\
Persona: {persona}
{topic_line}

Write the question this person would post on an {portal}. Write it in the first person, as \
one paragraph of 80 to 180 words, the way a real person asks: with nitty-gritty details such \
as names, ages, numbers, amounts, dates, places, what has happened so far and what they have \
already tried. End with the specific thing they want to know. Output only the question."""

QUERY_TOPIC_LINE = "Their question is about: {topic}"
QUERY_NO_TOPIC_LINE = "Choose a {domain} problem this person could realistically have."

RESPONSE_PROMPT = """\
Someone asked the question below on an {portal}. Write the portal's reply at this level:

{definition}

Length: about {words} words. Write in English, in complete sentences, addressed to the \
person. Do not mention the level, these instructions, or that you are an AI. Output only \
the reply.

Question:
{query}"""


def portal_for(domain: str) -> Tuple[str, str]:
    """(portal description, professional) for a domain, with a sensible default."""
    return PORTALS.get(domain, (f"online {domain} advice portal", f"a qualified {domain} professional"))


def _chat(user: str) -> List[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def root_personas_messages(domain: str, n: int) -> List[dict]:
    return _chat(ROOT_PERSONAS_PROMPT.format(n=n, domain=domain, portal=portal_for(domain)[0]))


def related_personas_messages(domain: str, persona: str, topic: str, n: int) -> List[dict]:
    return _chat(RELATED_PERSONAS_PROMPT.format(n=n, domain=domain, portal=portal_for(domain)[0],
                                                persona=persona, topic=topic or "(not given)"))


def query_messages(domain: str, persona: str, topic: str = "") -> List[dict]:
    line = QUERY_TOPIC_LINE.format(topic=topic) if topic else QUERY_NO_TOPIC_LINE.format(domain=domain)
    return _chat(QUERY_PROMPT.format(persona=persona, topic_line=line, portal=portal_for(domain)[0]))


def response_messages(domain: str, level: str, query: str, words: int) -> List[dict]:
    definition = LEVEL_DEFINITIONS[level]
    if level != "expert":  # defer to the domain's own professional, not to "an expert" in general
        definition += f" (Here the professional to consult is {portal_for(domain)[1]}.)"
    return _chat(RESPONSE_PROMPT.format(portal=portal_for(domain)[0], definition=definition, words=words,
                                        query=query))


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parse_persona_list(text: str) -> List[Tuple[str, str]]:
    """(persona, topic) pairs from a JSON array answer, tolerating code fences and chatter.

    Items may be objects with "persona" (and "topic" or "query") or bare strings;
    anything else is skipped. An answer with no parsable array gives [].
    """
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start, end = body.find("["), body.rfind("]")
    if start < 0 or end <= start:
        return []
    try:
        items = json.loads(body[start:end + 1])
    except ValueError:
        return []
    out = []
    for item in items if isinstance(items, list) else []:
        persona: Optional[str]
        if isinstance(item, str):
            persona, topic = item, ""
        elif isinstance(item, dict):
            persona = item.get("persona")
            topic = item.get("topic") or item.get("query") or ""
        else:
            continue
        if isinstance(persona, str) and persona.strip():
            out.append((" ".join(persona.split()), " ".join(str(topic).split())))
    return out
