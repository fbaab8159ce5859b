"""VQA answer normalisation, exactly as the official vqaEval.py does it.

Whitespace, punctuation, periods, lowercase, number words, articles and contractions. It lives
in a leaf module of its own because two sides need it: the VQA v2 loader (answer vocabulary and
soft targets, `ray_updown.data.vqa`) and the official accuracy (`ray_updown.metrics.vqa_eval`),
and the accuracy in turn loads questions through the loader.
"""

from __future__ import annotations

import re

__all__ = ["CONTRACTIONS", "NUMBER_WORDS", "ARTICLES", "PUNCTUATION", "strip_whitespace",
           "process_punctuation", "process_digit_article", "normalize_answer"]

# The official tool's contraction table, as "without=with" pairs. Lookups happen after
# lowercasing, so the capitalised keys ("Im", "Ive", ...) can never match; kept for fidelity.
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Apostrophes and colons are NOT in the official list (contractions survive).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
# As written in the official tool: "(?!<=\d)" is a look-ahead (not a look-behind), so this
# removes every period that is not followed by a digit ("yes." -> "yes", "2.5" stays).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official tool passes re.UNICODE (= 32) where re.sub expects `count`: at most 32 periods
# are removed from one answer. Reproduced so that scores match the server to the last digit.
_PERIOD_COUNT = int(re.UNICODE)


def strip_whitespace(text: str) -> str:
    """Tabs and newlines to spaces, then strip both ends (applied to every answer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """A punctuation mark next to a space, or anywhere in an answer holding digit,digit
    ("1,000"), is deleted; elsewhere it becomes a space ("black/white" -> "black white").
    Then periods not followed by a digit are deleted."""
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        # The test looks at the original text, the replacement works on the running result.
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lowercase, number words -> digits, drop a/an/the, add apostrophes to contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The full answer normalisation: whitespace, punctuation, digits, articles, contractions.

    Used for the answer vocabulary and soft targets (as the public re-implementation does) and
    by the accuracy whenever the ten human answers disagree.
    """
    return process_digit_article(process_punctuation(strip_whitespace(answer)))
