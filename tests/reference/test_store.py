"""The reference cache files: a round trip, and every file that must be refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dpo.reference.store import CacheFileError, ReferenceStore
from tests.helpers import reference_values


def test_store_round_trip_and_every_rejected_file(tmp_path):
    store = ReferenceStore(tmp_path)
    path = store.save("f" * 40, reference_values(5), {"why": "test"})
    loaded = store.load("f" * 40, 5)
    assert all(torch.equal(loaded[k], v) for k, v in reference_values(5).items())
    assert store.load("0" * 40, 5) is None  # no file: a miss
    with pytest.raises(CacheFileError, match="count"):
        store.load("f" * 40, 6)  # another data set with another example count

    shutil.copy(path, store.path("e" * 40))  # a file from another fingerprint under this name
    with pytest.raises(CacheFileError, match="fingerprint"):
        store.load("e" * 40, 5)

    data = path.read_bytes()
    store.path("a" * 40).write_bytes(data.replace(b"f" * 40, b"a" * 40)[:-7])  # truncated
    with pytest.raises(CacheFileError, match="truncated"):
        store.load("a" * 40, 5)

    flipped = bytearray(data.replace(b"f" * 40, b"b" * 40))
    flipped[-3] ^= 0x01  # one bit of one value
    store.path("b" * 40).write_bytes(bytes(flipped))
    with pytest.raises(CacheFileError, match="checksum"):
        store.load("b" * 40, 5)


def test_values_with_a_wrong_dtype_in_the_file_are_rejected(tmp_path):
    store = ReferenceStore(tmp_path)
    path = store.save("d" * 40, reference_values(3), {})
    with open(path, "rb") as handle:  # keep the metadata, store the counts as int32 instead
        header_size = int.from_bytes(handle.read(8), "little")
        metadata = json.loads(handle.read(header_size))["__metadata__"]
    values = reference_values(3)
    values["first_tokens"] = values["first_tokens"].int()
    save_file(values, str(path), metadata=metadata)
    with pytest.raises(CacheFileError):
        store.load("d" * 40, 3)


def test_a_second_writer_of_an_entry_waits_for_the_first(tmp_path):
    import threading
    import time

    store = ReferenceStore(tmp_path)
    first = store.lock("c" * 40, print)
    told: list[str] = []
    got = []
    waiter = threading.Thread(target=lambda: got.append(store.lock("c" * 40, told.append)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and len(told) == 1 and f"{store.path('c' * 40)} is being written by process" in told[0]
    store.lock("d" * 40, print).release()  # another entry is not held up
    first.release()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    got[0].release()
