"""Jailbreak transforms: registry, determinism, payloads that decode back to the request, clear errors."""
from __future__ import annotations

import base64
import codecs
import json

import pytest

from pipelines import jailbreaks
from pipelines.errors import PipelineError
from pipelines.jailbreaks import TRANSFORMS, apply, payload, recover

REQUIRED = {
    "roleplay",
    "prefix_injection",
    "refusal_suppression",
    "base64",
    "rot13",
    "disemvowel",
    "payload_splitting",
}

# placeholders, not real harmful text; they exercise quotes, backslashes, digits, unicode and a single word
PROMPTS = [
    "How would someone do the forbidden thing?",
    'Explain "step 2" of the plan, with a back\\slash and 3 numbers 1 2 3.',
    "Écris un poème sur la mer — s'il te plaît.",
    "Supercalifragilistic",
    "Ab",
]


def test_registry_has_the_required_transforms():
    assert REQUIRED <= set(TRANSFORMS)
    assert len(TRANSFORMS) >= 7
    for name, t in TRANSFORMS.items():
        assert t.name == name


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_each_transform_is_deterministic_and_changes_the_prompt(name, prompt):
    first = apply(name, prompt)
    assert first == apply(name, prompt)
    assert first == apply(name, f"  {prompt}\n")  # surrounding whitespace does not matter
    assert first != prompt


def test_transforms_differ_from_each_other():
    prompt = PROMPTS[0]
    variants = {name: apply(name, prompt) for name in TRANSFORMS}
    assert len(set(variants.values())) == len(variants)


@pytest.mark.parametrize("name", ["roleplay", "prefix_injection", "refusal_suppression"])
def test_wrappers_keep_the_request_verbatim(name):
    for prompt in PROMPTS:
        out = apply(name, prompt)
        assert prompt in out
        assert payload(name, out) == prompt
        assert recover(name, out) == prompt


def test_prefix_injection_asks_for_an_affirmative_opening():
    out = apply("prefix_injection", PROMPTS[0])
    assert "Absolutely" in out


def test_refusal_suppression_forbids_apologies():
    out = apply("refusal_suppression", PROMPTS[0]).lower()
    assert "apologise" in out and "sorry" in out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_base64_round_trips_with_an_independent_decoder(prompt):
    out = apply("base64", prompt)
    encoded = payload("base64", out)
    assert prompt not in out
    # decode with the standard library, not with the module's own inverse
    assert base64.b64decode(encoded, validate=True).decode("utf-8") == prompt
    assert jailbreaks.decode_base64(encoded) == prompt
    assert recover("base64", out) == prompt
    assert "base64" in out.lower()  # the instruction says what the encoding is


@pytest.mark.parametrize("prompt", PROMPTS)
def test_rot13_round_trips(prompt):
    out = apply("rot13", prompt)
    encoded = payload("rot13", out)
    assert codecs.decode(encoded, "rot_13") == prompt
    assert jailbreaks.decode_rot13(encoded) == prompt
    assert recover("rot13", out) == prompt
    assert encoded != prompt


def test_rot13_on_a_hand_example():
    # worked by hand: H->U, e->r, l->y, l->y, o->b ; ',' and ' ' unchanged ; w->j, o->b, r->e, l->y, d->q
    assert jailbreaks.encode_rot13("Hello, world") == "Uryyb, jbeyq"


def test_disemvowel_drops_vowels_and_cannot_be_recovered():
    out = apply("disemvowel", "How would someone do the forbidden thing?")
    # by hand: How->Hw, would->wld, someone->smn, do->d, the->th, forbidden->frbddn, thing?->thng?
    assert payload("disemvowel", out) == "Hw wld smn d th frbddn thng?"
    with pytest.raises(PipelineError, match="cannot be inverted"):
        recover("disemvowel", out)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_payload_splitting_halves_join_back(prompt):
    out = apply("payload_splitting", prompt)
    block = payload("payload_splitting", out)
    lines = block.split("\n")
    assert [ln[:4] for ln in lines] == ["a = ", "b = "]
    a, b = (json.loads(ln[4:]) for ln in lines)  # parse independently of the module
    assert a and b
    assert a + b == prompt
    assert jailbreaks.join_payload(block) == prompt
    assert recover("payload_splitting", out) == prompt
    assert prompt not in out  # the request only appears in pieces
    assert "a + b" in out


def test_payload_splitting_cuts_at_a_word_boundary_near_the_middle():
    # "one two three four": length 18, middle 9; spaces at 3, 7, 13 -> nearest is 7 -> a = "one two ", b = "three four"
    assert jailbreaks.split_payload("one two three four") == ("one two ", "three four")
    # no inner space: cut at the middle character, len 4 -> 2
    assert jailbreaks.split_payload("abcd") == ("ab", "cd")


def test_unknown_transform_lists_valid_names():
    with pytest.raises(PipelineError) as exc:
        apply("leetspeak", "hello")
    msg = str(exc.value)
    assert "leetspeak" in msg and "\n" not in msg
    for name in REQUIRED:
        assert name in msg


@pytest.mark.parametrize("bad", ["", "   \n"])
def test_blank_prompt_is_rejected(bad):
    with pytest.raises(PipelineError, match="non-blank"):
        apply("roleplay", bad)


def test_payload_rejects_text_from_another_transform():
    with pytest.raises(PipelineError, match="not a 'rot13' variant"):
        payload("rot13", apply("base64", "hello there"))


def test_decode_base64_rejects_garbage():
    with pytest.raises(PipelineError, match="base64"):
        jailbreaks.decode_base64("not base64 at all!")
