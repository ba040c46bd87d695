"""A judge model's pairwise verdicts (``eval.judge``): which of two answers is better, asked in both orders.

Any OpenAI-compatible endpoint serves as the judge (``raytune-it serve``, vLLM, a hosted API). Each
example of an effect is judged twice, the tuned model's answer first and then second, so a judge that
prefers a position cancels out. A verdict counts only if the judge's reply is exactly ``A``, ``B`` or
``tie`` (case and surrounding spaces or a final full stop aside): anything else is counted as
unparseable, never guessed. The win rate is (wins + ties / 2) over the parsed verdicts.
"""

from __future__ import annotations

import os
import re
from typing import Any

from raytune_it.evaluation.harness import describe

VERDICT = re.compile(r"^\s*(a|b|tie)\s*\.?\s*$", re.IGNORECASE)
PROMPT = ("You compare two answers to the same task. Reply with exactly one word: A if answer A is better, "
          "B if answer B is better, tie if they are equally good.\n\nTask: {prompt}\n{context}"
          "Reference answer: {reference}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\nVerdict (A, B or tie):")


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'tie', or None for a reply that is not exactly one of them."""
    match = VERDICT.match(text or "")
    return None if match is None else {"a": "A", "b": "B", "tie": "tie"}[match.group(1).lower()]


def _headers(judge: Any) -> dict[str, str]:
    from raytune_it.errors import ConfigError

    if not judge.api_key_env:
        return {}
    key = os.environ.get(judge.api_key_env)
    if not key:
        raise ConfigError(f"eval.judge.api_key_env: the environment variable {judge.api_key_env} is not set; set it "
                          "to the judge endpoint's API key, or leave api_key_env out for an endpoint without one")
    return {"Authorization": f"Bearer {key}"}


def check_judge(judge: Any) -> None:
    """Before any adapter is trained or any answer scored: the judge's key is set, its endpoint answers and
    accepts the key, and it serves ``judge.model`` (where it lists its models, as OpenAI's API does)."""
    import httpx

    from raytune_it.errors import ConfigError

    try:
        response = httpx.get(f"{judge.url}/models", headers=_headers(judge), timeout=judge.timeout_s)
    except httpx.HTTPError as exc:
        raise ConfigError(f"eval.judge.url: cannot reach {judge.url} ({type(exc).__name__}: {exc}); start the "
                          "judge's endpoint, or fix the URL") from None
    if response.status_code in (401, 403):
        raise ConfigError(f"eval.judge: {judge.url} refused the key ({response.status_code}); check "
                          "eval.judge.api_key_env")
    try:
        served = [item["id"] for item in response.json()["data"]] if response.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        served = None  # an endpoint without OpenAI's model list: the first verdict tells
    if served is not None and judge.model not in served:
        raise ConfigError(f"eval.judge.model: {judge.model!r} is not served at {judge.url}; it serves: "
                          f"{', '.join(map(str, served)) or 'nothing'}")


def judge_effects(judge: Any, outcome: dict[str, Any], answers: dict[str, dict[str, list[str]]],
                  console: Any) -> list[dict[str, Any]]:
    """For each effect: the judge's wins, losses, ties and unparseable verdicts for its model against its
    baseline, over up to ``judge.max_examples`` examples of its families, each judged in both orders."""
    import httpx

    results = []
    with httpx.Client(base_url=judge.url, headers=_headers(judge), timeout=judge.timeout_s) as client:
        for item in outcome["effects"]:
            counts = {"wins": 0, "losses": 0, "ties": 0, "unparseable": 0}
            pairs = [(outcome["eval_set"][family][i], answers[item["model"]][family][i],
                      answers[item["baseline"]][family][i])
                     for family in item["families"] for i in range(len(outcome["eval_set"][family]))]
            for record, ours, theirs in pairs[:judge.max_examples]:
                for first, second, ours_is in ((ours, theirs, "A"), (theirs, ours, "B")):
                    verdict = parse_verdict(_ask(client, judge.model, record, first, second))
                    if verdict is None:
                        counts["unparseable"] += 1
                    elif verdict == "tie":
                        counts["ties"] += 1
                    else:
                        counts["wins" if verdict == ours_is else "losses"] += 1
            parsed = counts["wins"] + counts["losses"] + counts["ties"]
            results.append({"effect": item["name"], "model": item["model"], "baseline": item["baseline"],
                            "judge": judge.model, **counts,
                            "win_rate": (counts["wins"] + counts["ties"] / 2) / parsed if parsed else None})
            console.print(f"judge ({judge.model}): {item['model']} vs {item['baseline']} on {item['name']}: "
                          f"{counts['wins']} wins, {counts['losses']} losses, {counts['ties']} ties, "
                          f"{counts['unparseable']} unparseable", markup=False, highlight=False)
    return results


def _ask(client: Any, model: str, record: dict, a: str, b: str) -> str:
    import httpx

    from raytune_it.data.prompt_format import split_reference
    from raytune_it.errors import UserError

    question = describe(record)
    context = f"Input: {question['input']}\n" if question["input"] else ""
    prompt = PROMPT.format(prompt=question["prompt"], context=context, reference=split_reference(record)[1] or "-",
                           a=a or "(empty)", b=b or "(empty)")
    try:
        response = client.post("/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 4})
    except httpx.TimeoutException:
        return ""  # counted as unparseable: a judge too slow once has given no verdict
    except httpx.HTTPError as exc:
        raise UserError(f"eval.judge: lost {judge_url(client)} ({type(exc).__name__}: {exc})") from None
    if response.status_code in (401, 403, 404):
        raise UserError(f"eval.judge: {judge_url(client)} answered {response.status_code}: "
                        f"{response.text[:200]} (check eval.judge.model and eval.judge.api_key_env)")
    if response.status_code != 200:
        return ""  # counted as unparseable: a judge that failed once has given no verdict
    try:
        return str(response.json()["choices"][0]["message"].get("content") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""  # a reply that is not OpenAI's shape: no verdict either


def judge_url(client: Any) -> str:
    return str(client.base_url)
