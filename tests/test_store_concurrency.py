"""ProfileStore under many writers and readers: handles and processes, locking, fresh reads, create's refusals.

Child processes come from a "forkserver" context (`test_crash_safety.forkserver_context`) whose server imported xpeft
once, so each child starts in milliseconds and the pytest process (which runs torch ops) is never forked.
"""

from __future__ import annotations

import pickle
import re
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from test_crash_safety import forkserver_context
from xpeft import ProfileStore
from xpeft.x_peft.store import STORE_FORMAT

LAYERS, BANK_SIZE = 2, 4
WRITERS, ADDS = 4, 250


def store_config(**kwargs):
    """The fields `ProfileStore.create` reads from an X-PEFT config (soft masks: any finite payload is valid)."""
    return SimpleNamespace(
        **({"bank_fingerprint": "f" * 64, "mask_type": "soft", "hard_k": 1, "bank_size": BANK_SIZE} | kwargs)
    )


def payload(code: int) -> torch.Tensor:
    """A distinct valid soft payload per code."""
    return torch.arange(LAYERS * 2 * BANK_SIZE, dtype=torch.float32).view(LAYERS, 2, BANK_SIZE) + 1000.0 * code


def code_of(name: str) -> int:
    writer, index = re.fullmatch(r"w(\d+)-(\d+)", name).groups()
    return int(writer) * ADDS + int(index)


def writer(path: str, writer_id: int, start) -> None:
    store = ProfileStore(path)  # one handle for all its adds: its cached index goes stale after every other writer
    start.wait()
    for i in range(ADDS):
        name = f"w{writer_id}-{i}"
        store.add({name: payload(code_of(name))})


def check_version(store: ProfileStore, names: list[str]) -> None:
    """Every listed name decodes to its own payload, and each writer's names are its first k, in order."""
    assert len(set(names)) == len(names), "a name is listed twice"
    for name in names:
        assert torch.equal(store.masks(name), payload(code_of(name))), f"{name} returned another payload"
    for w in range(WRITERS):
        own = [name for name in names if name.startswith(f"w{w}-")]
        assert own == [f"w{w}-{i}" for i in range(len(own))], f"writer {w}'s profiles are not a prefix: {own[:5]}"


def reader(path: str, stop, results) -> None:
    try:
        handle = ProfileStore(path)  # long-lived: must notice each new file
        seen, previous, done = set(), 0, False
        while not done:
            done = stop.is_set()  # one last check after the writers finished
            names = handle.list()
            assert len(names) >= previous, "the store shrank"
            check_version(handle, names)
            fresh = ProfileStore(path)
            assert len(fresh) >= len(names)
            seen.add(len(names))
            previous = len(names)
        results.put(("ok", len(seen), previous))
    except BaseException as error:  # report, do not hang the parent
        results.put(("error", repr(error), 0))


def test_four_writer_processes_and_a_reader_lose_nothing(tmp_path):
    path = tmp_path / "store.safetensors"
    ProfileStore.create(path, store_config(), layers=LAYERS)
    ctx = forkserver_context()
    start, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=writer, args=(str(path), w, start)) for w in range(WRITERS)]
    watcher = ctx.Process(target=reader, args=(str(path), stop, results))
    for process in [*writers, watcher]:
        process.start()
    began = time.perf_counter()
    start.set()
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0, f"writer exited with {process.exitcode}"
    elapsed = time.perf_counter() - began
    stop.set()
    status, detail, last = results.get(timeout=120)
    watcher.join(timeout=30)
    assert status == "ok", detail
    assert last == WRITERS * ADDS
    assert detail >= 3, f"the reader saw only {detail} versions of the store"
    store = ProfileStore(path)
    names = store.list()
    assert sorted(names) == sorted(f"w{w}-{i}" for w in range(WRITERS) for i in range(ADDS))
    check_version(store, names)
    print(f"{WRITERS}x{ADDS} adds in {elapsed:.1f} s; the reader checked {detail} versions")


def test_two_handles_in_one_process_see_each_others_profiles(tmp_path):
    path = tmp_path / "store.safetensors"
    ProfileStore.create(path, store_config(), layers=LAYERS)
    s1, s2 = ProfileStore(path), ProfileStore(path)
    s1.add({"alice": payload(1)})
    s2.add({"bob": payload(2)})
    for store in (s1, s2):
        assert store.list() == ["alice", "bob"] and len(store) == 2 and "alice" in store and "bob" in store
        assert torch.equal(store.get("alice"), payload(1))
        assert torch.equal(store.get("bob"), payload(2))
    s1.add({"bob": payload(3)})  # replace through the other handle
    assert torch.equal(s2.masks("bob"), payload(3))


def test_a_handle_follows_a_recreated_store_and_can_be_closed_and_pickled(tmp_path):
    path = tmp_path / "store.safetensors"
    old = ProfileStore.create(path, store_config(), layers=LAYERS)
    old.add({"alice": payload(1)})
    new = ProfileStore.create(path, store_config(bank_fingerprint="e" * 64), layers=LAYERS, overwrite=True)
    assert new.list() == [] and old.list() == [] and len(old) == 0 and "alice" not in old
    assert old.info["bank_fingerprint"] == "e" * 64
    with pytest.raises(KeyError, match="No profile 'alice'"):
        old.get("alice")
    new.add({"bob": payload(2)})
    old.close()
    assert torch.equal(old.get("bob"), payload(2))  # re-opened on access
    copy = pickle.loads(pickle.dumps(old))
    assert copy.path == old.path and torch.equal(copy.get("bob"), payload(2))
    with ProfileStore(path) as scoped:
        assert scoped.list() == ["bob"]


@pytest.mark.parametrize("layers", [2.5, True, 0, -1, "2", None])
def test_create_needs_a_positive_int_of_layers(tmp_path, layers):
    with pytest.raises(ValueError, match=r"`layers` must be a positive int, the number of layers the profiles adapt"):
        ProfileStore.create(tmp_path / "s.safetensors", store_config(), layers=layers)
    assert not (tmp_path / "s.safetensors").exists()


def test_create_refuses_to_replace_an_existing_file_unless_told(tmp_path):
    path = tmp_path / "s.safetensors"
    store = ProfileStore.create(path, store_config(), layers=LAYERS)
    store.add({"alice": payload(1)})
    with pytest.raises(
        FileExistsError, match=r"already exists; open it with `ProfileStore\(path\)`.*`overwrite=True`"
    ):
        ProfileStore.create(path, store_config(), layers=LAYERS)
    assert ProfileStore(path).list() == ["alice"]
    other = tmp_path / "other.bin"
    other.write_bytes(b"not a store")
    with pytest.raises(FileExistsError, match="already exists"):
        ProfileStore.create(other, store_config(), layers=LAYERS)
    assert other.read_bytes() == b"not a store"
    assert ProfileStore.create(path, store_config(), layers=LAYERS, overwrite=True).list() == []


def test_corrupt_store_errors_name_the_file_and_say_to_recreate_it(tmp_path):
    path = tmp_path / "s.safetensors"
    store = ProfileStore.create(path, store_config(), layers=LAYERS)
    store.add({"alice": payload(1), "bob": payload(2)})
    intact = path.read_bytes()
    named = re.escape(str(path))
    # cut inside the records: the open handle's next add reads the file under the lock and refuses it
    path.write_bytes(intact[:-10])
    with pytest.raises(ValueError, match=named + r".*truncated or corrupted\. Re-create it"):
        store.add({"carol": payload(3)})
    with pytest.raises(ValueError, match=named + r".*truncated or corrupted\. Re-create it"):
        ProfileStore(path)
    path.write_bytes(intact[:5])  # inside the header size: safetensors' own error would name no file
    with pytest.raises(ValueError, match=named + r".*truncated or corrupted\. Re-create it"):
        store.list()
    # a valid safetensors file whose index does not match its records
    info = (
        '{"bank_fingerprint": "'
        + "f" * 64
        + f'", "mask_type": "soft", "hard_k": 1, "bank_size": {BANK_SIZE}, "layers": {LAYERS}}}'
    )
    metadata = {"format": STORE_FORMAT, "info": info, "names": '["a", "b", "c"]'}
    save_file({"records": torch.zeros(2, LAYERS, 2, BANK_SIZE)}, path, metadata=metadata)
    with pytest.raises(ValueError, match=named + r" is a corrupted X-PEFT profile store.*re-create it"):
        ProfileStore(path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=named + " was deleted or moved; create one with"):
        store.get("alice")
