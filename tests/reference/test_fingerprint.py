"""Content identities of model folders: file digests memoized and redone on change, hub snapshots by commit."""

from __future__ import annotations

import os
import shutil

import pytest

from dpo.reference.fingerprint import HashIndex, IdentityError, folder_identity


def test_file_digests_are_memoized_and_redone_when_a_file_changes(tmp_path, assets):
    folder = shutil.copytree(assets["model"], tmp_path / "model")
    memo = tmp_path / "hashes.json"
    first = HashIndex(memo)
    identity = folder_identity(str(folder), first, "model.path")
    assert {p.name for p in first.hashed} == {"config.json", "model.safetensors"}  # tokenizer files left out
    again = HashIndex(memo)
    assert folder_identity(str(folder), again, "model.path") == identity and again.hashed == []

    # Same size, same mtime, different bytes: the ctime still moves, so the file is hashed again.
    weights = folder / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third = HashIndex(memo)
    changed = folder_identity(str(folder), third, "model.path")
    assert [p.name for p in third.hashed] == ["model.safetensors"]
    assert changed["files"]["model.safetensors"] != identity["files"]["model.safetensors"]
    assert changed["files"]["config.json"] == identity["files"]["config.json"]


def test_hub_models_are_identified_by_their_snapshot_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--tiny"

    def publish(commit: str) -> None:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    publish("a" * 40)
    assert folder_identity("org/tiny", HashIndex(None), "model.path") == {"hub": "org/tiny", "commit": "a" * 40}
    publish("b" * 40)
    assert folder_identity("org/tiny", HashIndex(None), "model.path")["commit"] == "b" * 40
    with pytest.raises(IdentityError, match="model.path: 'org/absent'"):
        folder_identity("org/absent", HashIndex(None), "model.path")


def test_a_gguf_checkpoint_is_identified_by_its_own_file_alone(tmp_path):
    from tests.helpers import build_tiny_gguf

    pytest.importorskip("gguf")
    folder = tmp_path / "model"
    build_tiny_gguf(folder, "a.gguf", seed=0)
    build_tiny_gguf(folder, "b.gguf", seed=1)
    (folder / "__init__.py").write_text("# a package folder, as a pip-installed model is\n")
    index = HashIndex(None)
    first = folder_identity(str(folder), index, "model.path", "a.gguf")
    assert first == {"gguf": "a.gguf", "files": {"a.gguf": first["files"]["a.gguf"]}}
    assert folder_identity(str(folder), index, "model.path", "b.gguf")["files"]["b.gguf"] != first["files"]["a.gguf"]
    (folder / "b.gguf").write_bytes(b"changed")  # another GGUF file of the folder does not count
    (folder / "__init__.py").write_text("# changed\n")
    assert folder_identity(str(folder), index, "model.path", "a.gguf") == first
    with pytest.raises(IdentityError, match="model.path: c.gguf is not a file in"):
        folder_identity(str(folder), index, "model.path", "c.gguf")
