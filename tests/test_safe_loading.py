"""Safe loading: no loader of the pipeline unpickles a checkpoint, none runs a checkpoint's own Python unless params say
so, and the source has no unsafe-deserialisation call.

The trap: a checkpoint directory whose only weights are `pytorch_model.bin`, a pickle whose unpickling creates a marker
file. Every loader must refuse it with a one-line error, the marker must never appear, and (audited with a Python audit
hook, in this process and in every CLI subprocess) nothing may even open the .bin file or resolve a pickle global.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import yaml

from conftest import ROOT, fake_params
from pipelines.errors import PipelineError
from pipelines.params import BaseModelParams, JudgeParams, load_params
from pipelines.params.common import TransformersBackend
from tiny_model import make_tiny_model

PICKLE_NAME = "pytorch_model.bin"


# ---------------------------------------------------------------------------- the trap
class _MakesMarker:
    """Unpickling an instance calls open(marker, "w"): the marker file appears iff something unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def trap_bytes(marker: Path) -> bytes:
    return pickle.dumps({"model.embed_tokens.weight": _MakesMarker(marker)})


_EVENTS: List[Tuple[str, str]] = []
_RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if not _RECORDING[0]:
        return
    if event == "pickle.find_class" or (event == "open" and isinstance(args[0], (str, bytes, os.PathLike))
                                        and str(args[0]).endswith(PICKLE_NAME)):
        _EVENTS.append((event, repr(args[:2])))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only inside `audited()`


@contextmanager
def audited() -> Iterator[List[Tuple[str, str]]]:
    """Record pickle global lookups and opens of pytorch_model.bin made in this process inside the block."""
    _EVENTS.clear()
    _RECORDING[0] = True
    try:
        yield _EVENTS
    finally:
        _RECORDING[0] = False


# Installed into each CLI subprocess through PYTHONPATH: the same audit, appended to a log file.
SITECUSTOMIZE = f'''
import os, sys
_log = os.environ.get("SAFE_LOADING_AUDIT_LOG")
if _log:
    def _hook(event, args):
        if event == "pickle.find_class" or (event == "open" and isinstance(args[0], (str, bytes, os.PathLike))
                                            and str(args[0]).endswith("{PICKLE_NAME}")):
            with open(_log, "a") as f:
                f.write(event + " " + repr(args[:2]) + "\\n")
    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def trap(tmp_path, tiny) -> Tuple[Path, Path]:
    """(checkpoint dir with config + tokenizer + pickle-only weights, marker path that must never exist)."""
    d = tmp_path / "pickle_ck"
    shutil.copytree(tiny, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    (d / PICKLE_NAME).write_bytes(trap_bytes(marker))
    return d, marker


def test_the_trap_and_the_audit_work(tmp_path):
    """Control: unpickling the trap does create the marker, and the audit hook sees the open and the global lookup.
    Without this, the tests below could pass for the wrong reason."""
    marker = tmp_path / "control_marker"
    f = tmp_path / PICKLE_NAME
    f.write_bytes(trap_bytes(marker))
    with audited() as events:
        with open(f, "rb") as fh:
            obj = pickle.load(fh)
    obj["model.embed_tokens.weight"].close()
    assert marker.exists()
    kinds = {e for e, _ in events}
    assert kinds == {"open", "pickle.find_class"}, events


# ---------------------------------------------------------------------------- in-process loaders
def _loaders(d: Path):
    from pipelines.backends import make_backend
    from pipelines.backends.local import load_model as backend_load_model
    from pipelines.base_model import load_base
    from pipelines.judges import make_judge
    from pipelines.spec import load_spec
    from pipelines.training_common import load_model as training_load_model
    from pipelines.training_common import require_model_dir

    spec = load_spec(ROOT / "data/spec", ["violence"])
    tb = {"kind": "transformers", "model": str(d)}
    return {
        "backends.local.load_model": lambda: backend_load_model(d),
        "make_backend(transformers)": lambda: make_backend(TransformersBackend(**tb)),
        "llm judge on a transformers backend": lambda: make_judge(JudgeParams(kind="llm", backend=tb), spec),
        "training_common.load_model": lambda: training_load_model(d),
        "training_common.require_model_dir": lambda: require_model_dir(d, "sft_checkpoint", "base_model"),
        "base_model.load_base(local_path)": lambda: load_base(BaseModelParams(local_path=str(d))),
    }


@pytest.mark.parametrize("name", list(_loaders(Path("x"))))
def test_loader_refuses_pickle_only_checkpoint(trap, name):
    d, marker = trap
    load = _loaders(d)[name]
    with audited() as events:
        with pytest.raises(PipelineError) as err:
            load()
    msg = str(err.value)
    assert "\n" not in msg and "safetensors" in msg and str(d) in msg, msg
    assert not marker.exists(), f"{name} unpickled {PICKLE_NAME}"
    assert events == [], f"{name} opened the pickle or resolved pickle globals: {events}"


def test_safetensors_win_when_both_are_present(trap, tiny):
    """A directory with both formats loads the safetensors and never touches the pickle."""
    from pipelines.backends.local import load_model as backend_load_model
    from pipelines.training_common import load_model as training_load_model

    d, marker = trap
    shutil.copy(tiny / "model.safetensors", d / "model.safetensors")
    with audited() as events:
        backend_load_model(d)
        training_load_model(d)
    assert events == [] and not marker.exists()


# ---------------------------------------------------------------------------- through the CLI, as dvc.yaml runs it
def test_every_stage_refuses_pickle_only_checkpoint_via_cli(tmp_path, trap):
    d, marker = trap
    w = tmp_path / "w"
    for sub in ("data/spec", "data/prompts", "data/evals"):
        shutil.copytree(ROOT / sub, w / sub)
    for place in ("data/base_model", "data/sft_checkpoint"):  # fixed inputs of sft_checkpoint and rl_checkpoint
        shutil.copytree(d, w / place)
    p = fake_params(categories=["violence"])
    p["base_model"]["local_path"] = str(d)
    p["eval_scores"]["models"] = {"base": str(d)}
    p["eval_scores"]["sets"] = {"harmful": 1, "benign": 0, "jailbreak": 0, "transformations": 0, "multilingual": 0}
    (w / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit_log = tmp_path / "audit.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1",
           "SAFE_LOADING_AUDIT_LOG": str(audit_log)}
    # raw_cots and `evaluate` load through the same backend loader as eval_scores (covered in-process above)
    commands = [["base_model"], ["eval_scores", "--model", "base"], ["sft_checkpoint"], ["rl_checkpoint"]]
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines", *c], cwd=w, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert proc.returncode == 2, f"{cmd}: rc {proc.returncode}\n{err[-2000:]}"
        assert len(errors) == 1 and "Traceback" not in err, f"{cmd}:\n{err[-2000:]}"
        assert "safetensors" in errors[0], errors[0]
    assert not marker.exists()
    assert not audit_log.exists(), audit_log.read_text()  # no subprocess opened the pickle or resolved a global
    assert not (w / "data/eval_scores").exists() and not (w / "data/.work").exists()


# ---------------------------------------------------------------------------- trust_remote_code
def test_trust_remote_code_is_off_by_default():
    assert TransformersBackend(kind="transformers").trust_remote_code is False
    p = load_params(ROOT / "params.yaml")
    backends = [p.raw_cots.generator, p.eval_scores.generator, *p.eval_scores.generators.values()]
    for judge in (p.judged_cots.judge, p.rl_checkpoint.judge, p.eval_scores.judge):
        if judge.backend is not None:
            backends.append(judge.backend)
    assert all(getattr(b, "trust_remote_code", False) is False for b in backends)
    assert "trust_remote_code: true" not in (ROOT / "params.yaml").read_text().lower()


REMOTE_CHECK = r'''
import json, sys
from pathlib import Path
d, marker = Path(sys.argv[1]), Path(sys.argv[2])
from pipelines.backends import make_backend
from pipelines.base_model import load_base
from pipelines.params import BaseModelParams
from pipelines.params.common import TransformersBackend
from pipelines.training_common import load_model
out = {}
def check(name, fn):
    marker.unlink(missing_ok=True)
    model = fn()
    out[name] = [type(model).__name__, marker.exists()]
cfg = lambda trust: TransformersBackend(kind="transformers", model=str(d), trust_remote_code=trust)
check("backend, params false", lambda: make_backend(cfg(False)).model)
check("training_common.load_model", lambda: load_model(d))
check("base_model local_path", lambda: load_base(BaseModelParams(local_path=str(d)))[0])
check("backend, params true", lambda: make_backend(cfg(True)).model)
print("RESULT " + json.dumps(out))
'''


def test_checkpoint_code_runs_only_when_params_say_so(tmp_path, tiny):
    """A checkpoint whose config maps AutoModelForCausalLM to its own module (which drops a marker when imported):
    every loader ignores that code unless the backend params set trust_remote_code: true, and then it is used, which
    shows the loader passes the params value on instead of hard-coding one."""
    d = tmp_path / "remote_ck"
    shutil.copytree(tiny, d)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (d / "own_model.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\n"
        "class OwnForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "own_model.OwnForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    proc = subprocess.run([sys.executable, "-c", REMOTE_CHECK, str(d), str(marker)], env=env, capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert got == {
        "backend, params false": ["LlamaForCausalLM", False],
        "training_common.load_model": ["LlamaForCausalLM", False],
        "base_model local_path": ["LlamaForCausalLM", False],
        "backend, params true": ["OwnForCausalLM", True],
    }


# ---------------------------------------------------------------------------- static scan of the source
UNSAFE = {
    "pickle.load": re.compile(r"\b(?:c?[Pp]ickle|_pickle)\.(?:load|loads|Unpickler)\b"),
    "from pickle import load": re.compile(r"from\s+(?:c?pickle|_pickle)\s+import\s+[^\n]*\b(?:load|loads|Unpickler)\b"),
    "torch.load": re.compile(r"\btorch\.load\b"),
    "joblib.load": re.compile(r"\bjoblib\.load\b"),
    "np.load(allow_pickle=True)": re.compile(r"\b(?:np|numpy)\.load\([^)]*allow_pickle\s*=\s*True", re.S),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*[=:]\s*True\b"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False\b"),
    "dill/cloudpickle load": re.compile(r"\b(?:dill|cloudpickle)\.loads?\b"),
    "pandas read_pickle": re.compile(r"\bread_pickle\b"),
    "marshal/shelve": re.compile(r"\b(?:marshal\.loads?|shelve\.open)\b"),
    "yaml.load without SafeLoader": re.compile(r"\byaml\.(?:load|load_all|unsafe_load)\((?![^)]*SafeLoader)"),
}
SHOULD_MATCH = {
    "pickle.load": "obj = pickle.load(f)", "from pickle import load": "from pickle import dumps, loads",
    "torch.load": "sd = torch.load(path, map_location='cpu')", "joblib.load": "m = joblib.load('m.joblib')",
    "np.load(allow_pickle=True)": "a = np.load(p,\n  allow_pickle=True)",
    "trust_remote_code=True": "AutoModel.from_pretrained(p, trust_remote_code=True)",
    "weights_only=False": "torch.serialization.load(p, weights_only=False)", "dill/cloudpickle load": "dill.loads(b)",
    "pandas read_pickle": "pd.read_pickle('x.pkl')", "marshal/shelve": "marshal.loads(b)",
    "yaml.load without SafeLoader": "yaml.load(text)",
}
SHOULD_NOT_MATCH = ["yaml.safe_load(text)", "yaml.load(text, Loader=yaml.SafeLoader)", "np.load(p)",
                    "trust_remote_code=trust_remote_code", "torch.loaded = 1", "pickle.dumps(x)"]


def scan(text: str) -> List[str]:
    return [name for name, rx in UNSAFE.items() if rx.search(text)]


def test_scanner_finds_what_it_looks_for():
    for name, sample in SHOULD_MATCH.items():
        assert name in scan(sample), (name, sample)
    for sample in SHOULD_NOT_MATCH:
        assert scan(sample) == [], sample


def test_source_has_no_unsafe_deserialisation():
    files = sorted([*(ROOT / "pipelines").rglob("*.py"), *(ROOT / "dagster_project").rglob("*.py")])
    assert len(files) > 20  # the scan really covers the packages
    hits = {str(f.relative_to(ROOT)): scan(f.read_text(encoding="utf-8")) for f in files}
    assert {f: h for f, h in hits.items() if h} == {}
