"""A real S3 round trip: an S3-compatible server (moto) on 127.0.0.1, a DVC S3 remote with `endpointurl`,
`dvc push` from one checkout, `dvc pull` into a fresh clone, identical md5s, and credentials in no file.

Needs `dvc-s3` (the `dvc[s3]` extra) and `moto[server]`, both in the `dev` extra.
"""
from __future__ import annotations

import secrets
import socket

import pytest

from dvc_repo import dvc_md5, files_under, lock_outs, reproduced_spine, sh

pytestmark = pytest.mark.slow
pytest.importorskip("dvc_s3", reason="dvc-s3 missing: pip install -e '.[dev]' (dev includes dvc[s3])")
moto_server = pytest.importorskip("moto.server", reason="moto[server] missing: pip install -e '.[dev]'")
boto3 = pytest.importorskip("boto3")

BUCKET = "daf-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on a free local port with one bucket, and credentials that exist only in the environment."""
    # Random per run, so finding them in a file can only mean something wrote them there.
    creds = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
             "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
             "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"endpoint": url, "client": client, "creds": creds}
    finally:
        server.stop()


def test_push_to_s3_and_pull_into_a_clone(tmp_path, s3):
    env = {"HOME": str(tmp_path / "home")}  # no ~/.aws or global DVC config from the machine
    origin = reproduced_spine(tmp_path / "origin")
    # What a user types; only the bucket and endpoint go to .dvc/config (git), credentials stay in the environment.
    sh(f"dvc remote add -d s3store s3://{BUCKET}/daf && dvc remote modify s3store endpointurl {s3['endpoint']}",
       origin, env=env)
    sh("git add .dvc/config && git commit -qm 'S3 remote'", origin, env=env)

    push = sh("dvc push", origin, env=env)
    assert "pushed" in push.stdout, push.stdout
    keys = [o["Key"] for page in s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert keys and all(k.startswith("daf/files/md5/") for k in keys), keys[:5]

    clone = tmp_path / "clone"
    sh(f"git clone -q {origin} {clone}", tmp_path, env=env)
    outs = lock_outs(clone)
    missing = [p for p in outs if not (clone / p).exists()]
    assert missing, "the clone should start without the DVC-cached outs"
    pull = sh("dvc pull", clone, env=env)
    assert "Running stage" not in pull.stdout + pull.stderr
    for path, md5 in outs.items():
        assert dvc_md5(clone / path) == md5, f"{path}: pulled content differs from dvc.lock"
    assert "up to date" in sh("dvc status", clone, env=env).stdout
    assert "in sync" in sh("dvc status --cloud", clone, env=env).stdout

    # Neither repo holds the key id or the secret: no file (workspace, .dvc/ config and cache, .git/), and no
    # commit (git objects are compressed, so the history is searched through git itself).
    needles = [s3["creds"]["AWS_ACCESS_KEY_ID"], s3["creds"]["AWS_SECRET_ACCESS_KEY"]]
    for repo in (origin, clone):
        for f in files_under(repo, skip=()):
            data = f.read_bytes()
            assert not any(n.encode() in data for n in needles), f"credential found in {f}"
        history = sh("git log --all -p --binary", repo).stdout
        assert not any(n in history for n in needles), f"credential found in the git history of {repo}"
