"""The evaluation harness: metrics, held-out sets and a tuned family scoring above the base model."""

import pytest

from helpers import train_tiny_adapter
from raytune_it.evaluation.harness import effect, score_models
from raytune_it.evaluation.metrics import exact_match, rouge_l, token_f1, tokens
from raytune_it.evaluation.sets import held_out_examples


def test_metrics_on_hand_computed_cases():
    assert exact_match("The BMI is 22.5 kg/m2.", "the bmi is 22.5 kg/m2") == 1.0
    assert exact_match("The BMI is 22.6 kg/m2.", "The BMI is 22.5 kg/m2.") == 0.0
    # 2 of 3 predicted tokens in a 4-token reference: P 2/3, R 1/2 -> F1 4/7
    assert token_f1("a b x", "a b c d") == pytest.approx(4 / 7)
    # LCS of (a c b) and (a b c d) is 2: P 2/3, R 2/4 -> 4/7; bag-of-words F1 sees 3 common
    assert rouge_l("a c b", "a b c d") == pytest.approx(4 / 7)
    assert token_f1("a c b", "a b c d") == pytest.approx(2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4))
    assert token_f1("", "x") == rouge_l("", "x") == 0.0


def _lcs_f1(prediction: str, reference: str) -> float:
    """The ROUGE-L eval computed by hand before it used rouge-score: LCS over the same word tokens."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for x in pred:
        current = [0]
        for j, y in enumerate(ref):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    return 0.0 if not lcs else 2 * (lcs / len(pred)) * (lcs / len(ref)) / (lcs / len(pred) + lcs / len(ref))


def test_rouge_l_from_rouge_score_matches_the_numbers_eval_gave_before():
    from raytune_it.data.synthetic import generate

    records = list(generate(60, seed=11))
    # the same outputs, paired with other references: answers that share some words and not others
    pairs = [(a["output"], b["output"]) for a, b in zip(records, records[1:] + records[:1])]
    pairs += [(r["output"], r["output"]) for r in records[:5]] + [("kg kg kg", "The BMI is 22.5 kg/m2.")]
    assert any(0 < _lcs_f1(p, r) < 1 for p, r in pairs)
    for prediction, reference in pairs:
        assert rouge_l(prediction, reference) == pytest.approx(_lcs_f1(prediction, reference), abs=1e-12)


def test_judge_verdicts_are_parsed_strictly():
    from raytune_it.evaluation.judge import parse_verdict

    assert [parse_verdict(t) for t in ("A", " b ", "Tie.", "tie")] == ["A", "B", "tie", "tie"]
    assert [parse_verdict(t) for t in ("A is better", "AB", "", "answer: B", "kg kg")] == [None] * 5


def test_held_out_examples_skip_what_training_saw():
    first = held_out_examples(["arithmetic"], 5, set())["arithmetic"]
    exclude = {(r["instruction"], r["input"]) for r in first[:3]}
    again = held_out_examples(["arithmetic"], 5, exclude)["arithmetic"]
    assert len(again) == 5 and not {(r["instruction"], r["input"]) for r in again} & exclude
    assert all(r["family"] == "arithmetic" for r in again)


def test_a_model_tuned_on_one_family_scores_it_above_the_base(tmp_path):
    adapter = train_tiny_adapter(tmp_path / "clause_type", ["clause_type"], steps=30, rank=16)
    from raytune_it.config import load_config
    from raytune_it.generation.answers import Answerer, resolve_models

    sets = held_out_examples(["clause_type"], 8, set())
    config = load_config("tiny-lora", [])
    entries = resolve_models("tiny-llama", {"base": "tiny-llama", "tuned": str(adapter)}, "eval.models")
    answerer = Answerer(config.serve, config.data, 4, entries)
    try:
        results, answers = score_models(answerer, entries, sets, max_new_tokens=24)
    finally:
        answerer.close()
    assert len(answers["tuned"]["clause_type"]) == 8
    tuned, base = results["tuned"]["clause_type"], results["base"]["clause_type"]
    assert tuned.examples == base.examples == 8
    assert tuned.token_f1 > base.token_f1 and tuned.rouge_l > base.rouge_l
    measured = effect("performance", "tuned beats base", results, "tuned", "base", ["clause_type"])
    assert measured.shows and measured.scores["token_f1"] == pytest.approx(tuned.token_f1)


def test_eval_driver_reports_the_three_effects_from_given_models(tmp_path):
    import json

    from raytune_it.config import load_config, save_config
    from raytune_it.data.synthetic import write_jsonl
    from raytune_it.evaluation.driver import evaluate
    from raytune_it.evaluation.sets import model_training_keys

    general = train_tiny_adapter(tmp_path / "general", ["arithmetic", "dosage", "deadline"], steps=12)
    medicine = train_tiny_adapter(tmp_path / "medicine", ["dosage"], steps=12)
    # The medicine adapter as a raytune-it run leaves it: its config.yaml beside the export names its training
    # data, which holds the very dosage examples eval would otherwise pick first.
    would_pick = held_out_examples(["dosage"], 2, set())["dosage"]
    write_jsonl(would_pick, tmp_path / "medicine-train.jsonl")
    save_config(load_config("tiny-lora", [f"data.path={tmp_path / 'medicine-train.jsonl'}"]), medicine)
    config = load_config("tiny-lora", [f"run.storage={tmp_path}", "eval.examples_per_family=2",
                                       "eval.max_new_tokens=12", "eval.held_out_families=[bmi,uppercase]"])
    outcome = evaluate(config, models={"general": str(general), "medicine": str(medicine)})
    saved = json.loads((tmp_path / "tiny-lora" / "eval" / "eval.json").read_text())
    assert saved["effects"] == outcome["effects"]
    assert set(saved["scores"]) == {"base", "general", "medicine"}
    assert saved["held_out_families"] == ["bmi", "uppercase"]
    # No model is scored on an example it was tuned on, and the number behind each family is saved.
    trained_on = model_training_keys(str(medicine))
    assert trained_on == {(r["instruction"], r["input"]) for r in would_pick}
    scored = {(r["instruction"], r["input"]) for examples in saved["eval_set"].values() for r in examples}
    assert scored and not scored & trained_on
    assert all(saved["scores"]["medicine"][f]["examples"] == len(saved["eval_set"][f]) for f in saved["eval_set"])
    assert "bmi" not in saved["seen_families"] and len(saved["seen_families"]) == 11
    assert saved["domain_families"] == ["dosage", "symptom_system"]  # medicine minus the held-out bmi
    effects = {e["name"]: e for e in saved["effects"]}
    assert list(effects) == ["performance", "task generalization", "domain specialization"]
    generalization = effects["task generalization"]
    assert (generalization["model"], generalization["baseline"], generalization["families"]) == (
        "general", "base", ["bmi", "uppercase"])
    # each effect's number is the example-weighted mean of the per-family scores it covers
    per_family = saved["scores"]["general"]
    counted = [f for f in ["bmi", "uppercase"] if per_family[f]["examples"]]
    expected = sum(per_family[f]["token_f1"] * per_family[f]["examples"] for f in counted) / sum(
        per_family[f]["examples"] for f in counted)
    assert generalization["scores"]["token_f1"] == pytest.approx(expected)
    assert generalization["shows"] == (generalization["scores"]["token_f1"]
                                       > generalization["baseline_scores"]["token_f1"])
