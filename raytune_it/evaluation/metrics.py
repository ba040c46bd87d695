"""Answer-level metrics: exact match, SQuAD-style token F1 and ROUGE-L (LCS F-measure, from ``rouge-score``).

All three compare lower-cased word tokens with punctuation stripped, so "The BMI is
22.5 kg/m2." and "the bmi is 22.5 kg/m2" match exactly: rouge-score is given the
same tokenizer (its own would split "22.5" into "22" and "5"). Token F1 is SQuAD's
definition, a few lines; ROUGE-L comes from the library that defines it.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

_TOKEN = re.compile(r"[a-z0-9]+(?:[./][a-z0-9]+)*")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def exact_match(prediction: str, reference: str) -> float:
    return float(tokens(prediction) == tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _WordTokenizer:
    """rouge-score's tokenizer interface over ``tokens``, so ROUGE-L and token F1 see the same words."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence), computed by Google's ``rouge-score``."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)


METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}
