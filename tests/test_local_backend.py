"""The local transformers backend: the shared-head KV cache must not change what the model generates."""
from __future__ import annotations

import pytest

from pipelines.backends.local import TransformersChatBackend, cache_kw, shared_prefix_len
from pipelines.params.common import Sampling, TransformersBackend
from tiny_model import make_tiny_model

SYSTEM = "You follow the safety spec. " * 12  # a long head shared by every conversation, like spec(category)
USERS = ["hi", "how do I bake bread at home today", "tell me about the spec and its policies, please, in detail", "ok"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), layers=2, hidden=64, seed=3)


def backend(model_dir, prefix_cache: bool, batch_size: int = 3, reserved_kv: bool = True) -> TransformersChatBackend:
    cfg = TransformersBackend(kind="transformers", model=str(model_dir), batch_size=batch_size,
                              prefix_cache=prefix_cache, prefix_cache_min_tokens=8, reserved_kv=reserved_kv)
    return TransformersChatBackend(cfg)


def convs():
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": u}] for u in USERS]


def test_shared_prefix_len_keeps_one_own_token():
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 9]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # a row may not be entirely cached
    assert shared_prefix_len([[5, 1], [6, 1]]) == 0
    assert shared_prefix_len([]) == 0


def test_next_token_logits_match_plain_left_padding(model_dir):
    """The [head][padding][tail] layout over a cached head gives the logits of an ordinary left-padded batch."""
    import copy

    import torch

    be = backend(model_dir, prefix_cache=True)
    rows = [be.tok(be.render(c, None), add_special_tokens=False)["input_ids"] for c in convs()]
    head = shared_prefix_len(rows)
    assert head >= 8 and len({len(r) for r in rows}) > 1, "the test needs a shared head and tails of unequal length"
    with torch.inference_mode():
        plain_ids, plain_mask = be._layout(rows, 0)  # head 0 = plain left padding
        plain = be.model(input_ids=plain_ids, attention_mask=plain_mask,
                         position_ids=(plain_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        ids, mask = be._layout(rows, head)
        cache = copy.deepcopy(be._encode_head(rows[0][:head]))
        cache.batch_repeat_interleave(len(rows))
        cached = be.model(input_ids=ids[:, head:], attention_mask=mask, **{cache_kw(be.model): cache},
                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, head:]).logits[:, -1]
    assert torch.allclose(plain, cached, atol=1e-4), (plain - cached).abs().max()


def test_sampled_output_identical_with_and_without_head_cache(model_dir):
    # A random tiny model is degenerate under greedy decoding; sampled text with one seed is a sharper comparison.
    hot = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0)
    a = backend(model_dir, prefix_cache=False).generate(convs(), 2, hot, progress=False)
    b = backend(model_dir, prefix_cache=True).generate(convs(), 2, hot, progress=False)
    assert a == b
    assert len(b) == len(USERS) and all(len(x) == 2 for x in b)


@pytest.mark.parametrize("reserved_kv", [True, False])
def test_per_conversation_prefill_and_stop_with_head_cache(model_dir, reserved_kv):
    hot = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=10, seed=1)
    heads = ["<think>\nA", "<think>\nBB", "<think>\n", "<think>\nCategory"]
    a = backend(model_dir, False, reserved_kv=False).generate(convs(), 1, hot, prefill=heads, progress=False,
                                                              stop=["\n"])
    b = backend(model_dir, True, reserved_kv=reserved_kv).generate(convs(), 1, hot, prefill=heads, progress=False,
                                                                   stop=["\n"])
    assert a == b
    assert all("\n" not in x[0] for x in b)


def test_sampling_with_head_cache_is_reproducible_and_varied(model_dir):
    hot = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=7)
    be = backend(model_dir, True)
    first = be.generate(convs(), 3, hot, progress=False)
    assert be.generate(convs(), 3, hot, progress=False) == first
    assert any(len(set(per)) > 1 for per in first), "n samples of one prompt should differ when sampling"


def test_repetition_penalty_reaches_generate(model_dir):
    # greedy decoding of the random tiny model repeats one token; a strong penalty must break the loop
    greedy = Sampling(temperature=0.0, max_new_tokens=12, seed=0)
    be = backend(model_dir, True)
    plain = be.generate(convs()[:2], 1, greedy, progress=False)
    penalised = be.generate(convs()[:2], 1, greedy.model_copy(update={"repetition_penalty": 5.0}), progress=False)
    assert all(len(set(x[0])) <= 2 for x in plain), plain  # the loop this guards against
    assert all(len(set(x[0])) > 2 for x in penalised), penalised


def test_reserved_kv_cache_matches_dynamic_cache_through_reallocations(model_dir):
    """Token-by-token decoding with the reserved-buffer cache (reserve 2: it must regrow several times) gives the
    logits of transformers' DynamicCache, with and without a shared head copied into the rows."""
    import torch
    from transformers import DynamicCache

    from pipelines.backends.local import rows_cache

    be = backend(model_dir, prefix_cache=True)
    torch.manual_seed(0)
    seq = torch.randint(0, be.model.config.vocab_size, (3, 12))
    seq[:, :4] = seq[:1, :4]  # a 4-token head shared by the rows
    with torch.inference_mode():
        head = DynamicCache(config=be.model.config)
        be.model(input_ids=seq[:1, :4], **{cache_kw(be.model): head}, use_cache=True)
        for start, ours in [(0, rows_cache(be.model, None, 3, reserve=2)),
                            (4, rows_cache(be.model, head, 3, reserve=2))]:
            ref = DynamicCache(config=be.model.config)
            if start:
                be.model(input_ids=seq[:, :start], **{cache_kw(be.model): ref}, use_cache=True)
            for t in range(start, seq.shape[1]):
                a = be.model(input_ids=seq[:, t:t + 1], **{cache_kw(be.model): ref}, use_cache=True).logits
                b = be.model(input_ids=seq[:, t:t + 1], **{cache_kw(be.model): ours}, use_cache=True).logits
                assert torch.allclose(a, b, atol=1e-5), (start, t, (a - b).abs().max())
            assert ours.get_seq_length() == seq.shape[1]


def test_backend_output_equals_plain_generate(model_dir):
    """Our cache handling is invisible: the backend samples what model.generate with its default cache samples."""
    import torch

    hot = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=5)
    be = backend(model_dir, prefix_cache=False, batch_size=8)
    ours = be.generate(convs(), 1, hot, progress=False)
    rows = [be.tok(be.render(c, None), add_special_tokens=False)["input_ids"] for c in convs()]
    ids, mask = be._layout(rows, 0)
    torch.manual_seed(hot.seed)
    with torch.inference_mode():
        gen = be.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.9,
                                top_k=None, max_new_tokens=10, pad_token_id=be.tok.pad_token_id)
    plain = be.tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    assert [x[0] for x in ours] == plain
