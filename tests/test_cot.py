"""CoT/answer splitting, including malformed samples (never a crash)."""
from pipelines.cot import join_cot, split_cot


def test_well_formed():
    p = split_cot("<think>\nPolicy V.2 applies.\n</think>\nI'm sorry, but I can't help with that.")
    assert p.ok and p.cot == "Policy V.2 applies." and p.answer.startswith("I'm sorry")


def test_prefilled_without_open_tag_and_odd_spacing():
    p = split_cot("Category: Violence (V). Relevant policy: V.1.\n< / THINK >\nHere is how.")
    assert p.ok and p.cot.startswith("Category") and p.answer == "Here is how."


def test_malformed_samples_are_flagged():
    assert split_cot("<think> rambling forever").problem == "no_close_tag"
    assert split_cot("<think></think> answer").problem == "empty_cot"
    assert split_cot("<think>x</think>   ").problem == "empty_answer"
    assert split_cot("<think>a</think> b <think>c</think> d").problem == "nested_think"
    assert split_cot("").ok is False and split_cot(None).ok is False


def test_join_round_trips():
    p = split_cot(join_cot("Cites S.1.", "You're not alone."))
    assert p.ok and (p.cot, p.answer) == ("Cites S.1.", "You're not alone.")
