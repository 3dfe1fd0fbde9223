"""Class 9 of issue 21: the "never unpickle" guard checked only that some *.safetensors existed.

Promise: before transformers is called, every weight file it would load is resolved (model.safetensors, or each shard
that model.safetensors.index.json names) and must be a well-formed safetensors file inside the checkpoint directory;
a shard index naming a .bin/.pt/pickle file or a path outside the directory, garbage safetensors bytes, an
unreadable config.json or tokenizer JSON, and a peft adapter config are all refused with one line naming the file.
No pickle file is ever opened. Before: an index mapping tensors to a .bin sent transformers to torch.load, and bad
config/safetensors bytes were tracebacks.
"""
from __future__ import annotations

import json
import os
import random
import struct
import sys
from pathlib import Path

import pytest

from pipelines.errors import PipelineError
from pipelines.training_common import require_model_dir

PICKLE_NAMES = ["pytorch_model.bin", "model.pt", "weights.pkl", "model-00002-of-00002.bin", "model.safetensors.bin",
                "model.ckpt", "shard.pth", "model.safetensors.pkl"]


def safetensors_bytes(tensors=(("w", 2),), header_extra: dict | None = None) -> bytes:
    header, offset = {}, 0
    for name, n in tensors:
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    header.update(header_extra or {})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def pickle_trap(path: Path, marker: Path) -> None:
    """A pickle that creates `marker` when unpickled (a stand-in for a malicious checkpoint)."""
    import pickle

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    path.write_bytes(pickle.dumps(Trap()))


def base_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    return d


def make_bad(d: Path, rng: random.Random, marker: Path):
    """Build one bad checkpoint in `d`; return (kind, words the error must contain)."""
    kind = rng.choice(["index_to_pickle", "index_to_pickle", "index_escape", "index_missing", "index_garbage",
                       "safetensors_garbage", "safetensors_garbage", "config_bad", "adapter", "tokenizer_bad",
                       "weights_dir"])
    base_dir(d)
    decoy = "model-00001-of-00002.safetensors"
    if kind.startswith("index"):
        (d / decoy).write_bytes(safetensors_bytes())  # the old guard only asked for some *.safetensors
        weight_map = {"a": decoy}
        if kind == "index_to_pickle":
            name = rng.choice(PICKLE_NAMES)
            pickle_trap(d / name, marker)
            weight_map[f"layer.{rng.randint(0, 9)}"] = name
            words = ["model.safetensors.index.json", name]
        elif kind == "index_escape":
            (d.parent / "outside.safetensors").write_bytes(safetensors_bytes())
            name = rng.choice(["../outside.safetensors", str(d.parent / "outside.safetensors"),
                               "sub/../../outside.safetensors"])
            weight_map["b"] = name
            words = ["outside"]
        elif kind == "index_missing":
            weight_map["b"] = f"model-{rng.randint(2, 9):05d}-of-00009.safetensors"
            words = ["not found"]
        if kind == "index_garbage":
            text = rng.choice(["{", "[]", "null", json.dumps({"weight_map": []}), json.dumps({"weight_map": {}}),
                               json.dumps({"weight_map": {"a": 3}}), json.dumps({"metadata": {}}),
                               bytes(rng.getrandbits(8) for _ in range(20)).decode("latin-1")])
            (d / "model.safetensors.index.json").write_text(text, encoding="latin-1")
            words = ["model.safetensors.index.json"]
        else:
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif kind == "safetensors_garbage":
        good = safetensors_bytes()
        choice = rng.randrange(9)
        data = [
            bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),      # random bytes
            struct.pack("<Q", 2 ** 40) + b"{}",                                 # header length huge
            struct.pack("<Q", 500) + b'{"w": 1}',                               # header longer than the file
            struct.pack("<Q", 8) + b"not json",                                 # header not JSON
            struct.pack("<Q", 8) + b"[1,2,3] ",                                 # header not an object
            safetensors_bytes(header_extra={"x": {"dtype": "F32", "shape": [9], "data_offsets": [0, 10 ** 6]}}),
            safetensors_bytes(header_extra={"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}),
            safetensors_bytes(tensors=()),                                      # no tensors
            good[:len(good) - rng.randint(1, 8)],                               # truncated data
        ][choice]
        (d / "model.safetensors").write_bytes(data)
        words = ["model.safetensors"]
    elif kind == "config_bad":
        (d / "model.safetensors").write_bytes(safetensors_bytes())
        (d / "config.json").unlink()
        bad = rng.choice([b"\xff\xfe{", b"{not json", b"[1, 2]", b"", b"null", "dir"])
        if bad == "dir":
            (d / "config.json").mkdir()
        else:
            (d / "config.json").write_bytes(bad)
        words = ["config.json"]
    elif kind == "adapter":
        (d / "model.safetensors").write_bytes(safetensors_bytes())
        (d / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "elsewhere"}))
        pickle_trap(d / "adapter_model.bin", marker)
        words = ["adapter_config.json"]
    elif kind == "tokenizer_bad":
        (d / "model.safetensors").write_bytes(safetensors_bytes())
        name = rng.choice(["tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                           "generation_config.json"])
        (d / name).write_bytes(rng.choice([b"{", b"\xff", b"{\"a\": }"]))
        words = [name]
    else:  # weights_dir: model.safetensors is a directory
        (d / "model.safetensors").mkdir()
        words = ["model.safetensors"]
    return kind, words


N_BAD = 160


def test_every_bad_checkpoint_is_refused_with_one_line_and_no_pickle_opened(tmp_path):
    from pipelines.io import check_safetensors_checkpoint

    rng = random.Random(0)
    marker = tmp_path / "UNPICKLED"
    kinds = set()
    for case in range(N_BAD):
        d = tmp_path / f"c{case}" / "ckpt"
        kind, words = make_bad(d, rng, marker)
        kinds.add(kind)
        for check in (lambda: check_safetensors_checkpoint(d), lambda: require_model_dir(d, "eval_scores", "x")):
            with pytest.raises(PipelineError) as e:
                check()
            msg = str(e.value)
            assert "\n" not in msg and str(d) in msg, (kind, msg)
            for w in words:
                assert w in msg, (kind, w, msg)
    assert not marker.exists()
    assert len(kinds) == 9  # every kind of damage was generated


def test_good_checkpoints_pass(tmp_path):
    from pipelines.io import check_safetensors_checkpoint

    single = base_dir(tmp_path / "single")
    (single / "model.safetensors").write_bytes(safetensors_bytes((("a", 3), ("b", 1))))
    (single / "pytorch_model.bin").write_bytes(b"not opened")  # present but never loaded (use_safetensors=True)
    check_safetensors_checkpoint(single)
    sharded = base_dir(tmp_path / "sharded")
    for i in (1, 2):
        (sharded / f"model-0000{i}-of-00002.safetensors").write_bytes(safetensors_bytes())
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    check_safetensors_checkpoint(sharded)


N_LOADER_CASES = 8


def test_the_real_loaders_refuse_before_transformers_opens_anything(tmp_path):
    """The loaders of every stage call the guard first: a sample of bad dirs through them, with an audit hook
    that records any open of a pickle-format file."""
    from pipelines.backends.local import load_model as backend_load
    from pipelines.training_common import load_model as training_load

    opened = []
    active = [False]  # on only while a loader runs (the test itself writes the pickle traps)

    def hook(event, args):
        if active[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            name = os.fsdecode(args[0])
            if name.endswith((".bin", ".pt", ".pkl", ".ckpt", ".pth")):
                opened.append(name)
    sys.addaudithook(hook)
    rng = random.Random(1)
    marker = tmp_path / "UNPICKLED"
    try:
        for case in range(N_LOADER_CASES):
            d = tmp_path / f"l{case}" / "ckpt"
            kind, _ = make_bad(d, rng, marker)
            for load in (backend_load, training_load):
                active[0] = True
                try:
                    with pytest.raises(PipelineError) as e:
                        load(d)
                finally:
                    active[0] = False
                assert "\n" not in str(e.value)
    finally:
        active[0] = False
    assert opened == [] and not marker.exists()
