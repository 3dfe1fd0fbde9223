"""Degenerate repetition: the loops a small model falls into ("E.1, E.2, E.3, ...", one sentence over and over).

A text is degenerate when it is long enough to judge (MIN_TOKENS word tokens) and either
    * a phrase of up to MAX_PERIOD tokens repeats back to back at least MIN_REPEATS times, over at least
      MIN_LOOP_TOKENS tokens (a loop, wherever it starts: a good opening followed by a loop is still a loop), or
    * at least MAX_REPEATED_SHARE of its word NGRAMs are repeats of an earlier one (a long phrase cycling with
      variations, which no short period catches).
Numbers are read as one token ("0"), so counting loops ("E.1, E.2, E.3") repeat like any other phrase, while a
numbered list of different items does not. Evaluation reports the share of degenerate outputs (`degenerate_rate`)
and the RL reward penalises them.
"""
from __future__ import annotations

import re
from typing import List, Tuple

NGRAM = 4  # words per n-gram of the repeated share
MAX_REPEATED_SHARE = 0.5  # half of the 4-grams already seen earlier: normal prose stays under 0.1
MIN_TOKENS = 12  # shorter texts are never flagged (a terse refusal is not a loop)
MAX_PERIOD = 12  # longest phrase, in tokens, the loop detector looks for
MIN_REPEATS = 4  # back-to-back copies of a phrase that make a loop ("very very very" is emphasis, not a loop)
MIN_LOOP_TOKENS = 12  # and the copies must cover this many tokens ("no no no no" is not a loop either)

_TOKEN = re.compile(r"[^\W_]+")
_NUMBER = re.compile(r"^\d+$")


def tokens(text: str) -> List[str]:
    """Lower-case word tokens, every number replaced by "0": "E.12, E.13" -> ["e", "0", "e", "0"]."""
    return ["0" if _NUMBER.match(t) else t for t in _TOKEN.findall((text or "").lower())]


def repeated_share(toks: List[str], n: int = NGRAM) -> float:
    """Share of the word n-grams that repeat an earlier n-gram of the same text; 0.0 when there are none."""
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def longest_loop(toks: List[str], max_period: int = MAX_PERIOD) -> Tuple[int, int]:
    """(period, tokens covered) of the longest back-to-back repetition of a phrase of 1..max_period tokens.

    A run of i where toks[i] == toks[i + period] for `run` positions in a row covers run + period tokens, i.e.
    (run + period) / period copies of the phrase. Ties go to the shorter period. (0, 0) when nothing repeats."""
    best = (0, 0)
    for period in range(1, min(max_period, len(toks) // 2) + 1):
        run = 0
        for i in range(len(toks) - period):
            run = run + 1 if toks[i] == toks[i + period] else 0
            if run and run + period > best[1]:
                best = (period, run + period)
    return best


def is_degenerate(text: str) -> bool:
    """True when the text loops (see the module docstring for the two criteria and their thresholds)."""
    toks = tokens(text)
    if len(toks) < MIN_TOKENS:
        return False
    period, covered = longest_loop(toks)
    if period and covered >= MIN_LOOP_TOKENS and covered >= MIN_REPEATS * period:
        return True
    return repeated_share(toks) >= MAX_REPEATED_SHARE
