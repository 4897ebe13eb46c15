"""Whether an LLM answer is usable as synthetic data: the clean-up step of ``meav data synthesize``.

An answer is dropped when it is empty, truncated (the server says it hit max_tokens,
or the text visibly stops mid-sentence) or not English. The language test is a
heuristic with no dependency: nearly all letters ASCII, and enough English function
words, which terse English prose still has (0.18 and up in the shipped data) and
other languages have next to none.
"""

from __future__ import annotations

import re
from typing import Optional

from meav_merge.data.schema import words
from meav_merge.data.synth.llm_client import ChatResult

_LABEL = re.compile(r"^\s*(?:\*\*)?(?:question|query|reply|response|answer)(?:\*\*)?\s*:\s*(?:\*\*)?\s*",
                    re.IGNORECASE)
_QUOTES = {'"': '"', "“": "”", "'": "'"}


def clean_reply(text: str) -> str:
    """Strip what models wrap around the text asked for: a leading label, enclosing quotes."""
    text = _LABEL.sub("", text.strip(), count=1).strip()
    if len(text) > 1 and text[0] in _QUOTES and text.endswith(_QUOTES[text[0]]):
        inner = text[1:-1]
        if text[0] not in inner and _QUOTES[text[0]] not in inner:  # one quoted whole, not two quotes
            text = inner.strip()
    return text


# Common English function words that are not also common words of the big European
# languages ("a", "de", "in", "do", "was", "will" are left out on purpose).
_ENGLISH_STOPWORDS = frozenset(
    "the and to of is you your that it for with this are have be not can i my me what should would could about "
    "if or at on by as but from they them has had been were which who their there when how we our he she his "
    "her its than then because all any some more most only also these those into after before within each "
    "other such very so up out just does did may might must get don't doesn't it's can't won't isn't you're "
    "i'm i've".split())
MIN_STOPWORD_SHARE = 0.12  # terse English prose runs at 0.2 and up, other languages near 0
MIN_ASCII_LETTER_SHARE = 0.9
_SENTENCE_END = tuple(".!?…)]\"'”’")
_LIST_ITEM = ("-", "*", "•") + tuple(f"{i}." for i in range(1, 30)) + tuple(f"{i})" for i in range(1, 30))


def looks_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < MIN_ASCII_LETTER_SHARE:
        return False
    tokens = [t for t in words(text) if not t.isdigit()]
    if len(tokens) < 5:  # too short to judge by function words
        return True
    return sum(t in _ENGLISH_STOPWORDS for t in tokens) / len(tokens) >= MIN_STOPWORD_SHARE


def looks_cut_off(text: str) -> bool:
    """Ends mid-sentence: no closing punctuation, unless the last line is a list item."""
    end = text.rstrip().rstrip("*_ ").rstrip()
    if not end or end.endswith(_SENTENCE_END):
        return False
    last_line = end.splitlines()[-1].strip()
    return not (last_line.startswith(_LIST_ITEM) and end[-1].isalnum())


def drop_reason(result: ChatResult) -> Optional[str]:
    """Why an LLM answer is unusable, or None."""
    text = clean_reply(result.text)
    if not text:
        return "empty"
    if result.finish_reason == "length" or looks_cut_off(text):
        return "truncated"
    if not looks_english(text):
        return "non_english"
    return None
