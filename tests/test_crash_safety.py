"""Crash safety of what xpeft writes: file modes, locks and stale temporaries of atomic writes; the crash-safe
`save_pretrained`; corrupt files named in errors; and SIGKILL at random (seeded) moments of `save_pretrained`,
`ProfileStore.add` and `build_bank`, after which the old or the new version must load completely.

Child processes come from a "forkserver" context whose server imported xpeft and the test models once, so each child
starts in milliseconds and the pytest process (which runs torch ops) is never forked.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import re
import signal
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from models import make_model, task_type
from xpeft import EtherConfig, ProfileStore, XPeftConfig, build_bank, saving
from xpeft.serialization import atomic_save_file
from xpeft.x_peft.bank import read_bank_file


def warm_caches() -> None:
    """Fill two caches the first peft model of a process fills (0.8 s): transformers' checkpoint conversion table (a
    thousand regular expressions) and `isinstance(module, BaseTunerLayer)` answers (an ABC, which walks all of peft's
    layer classes once per module class). Run at import, hence once in the forkserver for all its children. Pure
    Python: no torch op runs in the forkserver, so forking it stays safe.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.models.llama import modeling_llama

    with contextlib.suppress(ImportError):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")
    for namespace in (vars(modeling_llama), vars(torch.nn)):
        for value in list(namespace.values()):
            if isinstance(value, type) and issubclass(value, torch.nn.Module):
                issubclass(value, BaseTunerLayer)


warm_caches()

KILLS = 24
TEMP = re.compile(r"\.(?P<name>.+)\.xpeft-tmp-[0-9a-f]{32}")
STORE_LAYERS, STORE_BANK = 2, 64


def forkserver_context():
    """A "forkserver" context whose server imported xpeft, the test models and the child functions once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["xpeft", "models", "test_crash_safety", "test_store_concurrency"])
    # Python 3.11's forkserver preloads before it takes the parent's sys.path: give it the tests folder through the
    # environment it starts with (only the first call starts it).
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), previous]))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    return ctx


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def listing(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir()}


# -- what the children write (deterministic, so that the parent knows both versions) ---------------------------


def ether_model(adapters=("default",)):
    torch.manual_seed(0)
    config = dict(target_modules=["q_proj", "v_proj"], n_blocks=2, init_weights=False, task_type=task_type("llama"))
    model = get_peft_model(make_model("llama"), EtherConfig(**config))
    for name in adapters[1:]:
        model.add_adapter(name, EtherConfig(**config))
    return model


def set_version(model, version: int, adapter: str = "default") -> None:
    """Version 0 or 1 of `adapter`: different tensors, and a config field naming the version (to catch mixes)."""
    generator = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if f".{adapter}" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    model.peft_config[adapter].revision = f"version-{version}"


def store_payload(code: int) -> torch.Tensor:
    return torch.full((STORE_LAYERS, 2, STORE_BANK), float(code)) + torch.arange(STORE_BANK) / STORE_BANK


def store_config():
    return SimpleNamespace(bank_fingerprint="f" * 64, mask_type="soft", hard_k=1, bank_size=STORE_BANK)


def bank_adapters(version: int, count: int = 4, d: int = 512, r: int = 128):
    generator = torch.Generator().manual_seed(100 + version)
    return [
        {
            f"model.layers.{layer}.mlp.down_proj": {
                "A": torch.randn(r, d, generator=generator),
                "a": torch.randn(r, generator=generator),
                "B": torch.randn(d, r, generator=generator),
                "b": torch.randn(d, generator=generator),
            }
            for layer in range(2)
        }
        for _ in range(count)
    ]


# Each child prepares, says "ready", writes once when told (which also cleans up after the previous kill), reports,
# then writes in a loop when told "go" until it is killed.


def save_loop(folder: str, version: int, conn) -> None:
    warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecation, once per save
    model = ether_model()
    set_version(model, version)
    conn.send("ready")
    conn.recv()
    model.save_pretrained(folder)
    conn.send("written")
    conn.recv()
    while True:
        version ^= 1
        set_version(model, version)
        model.save_pretrained(folder)


def add_loop(path: str, conn) -> None:
    store = ProfileStore(path)
    conn.send("ready")
    conn.recv()
    count = len(store)
    store.add({f"p{count}": store_payload(count)})
    conn.send(count + 1)
    conn.recv()
    while True:
        count += 1
        store.add({f"p{count}": store_payload(count)})
        conn.send(count + 1)  # how many profiles the store surely holds


def bank_loop(path: str, version: int, conn) -> None:
    adapters = [bank_adapters(0), bank_adapters(1)]
    conn.send("ready")
    conn.recv()
    build_bank(adapters[version], path)
    conn.send("written")
    conn.recv()
    while True:
        version ^= 1
        build_bank(adapters[version], path)


def kill_rounds(target, make_args, after_kill, clean, max_delay: float, seed: int) -> tuple[Counter, int]:
    """Run KILLS children `target(*make_args(round), conn)`: after each one's first write check `clean()`, let it
    loop, SIGKILL it after a random (seeded) delay, and record `after_kill(its last message)`. The next child
    prepares while the parent checks. Returns the outcomes and how many kills left a temporary behind.
    """
    rng = random.Random(seed)
    ctx = forkserver_context()

    def spawn(round_):
        parent_conn, child_conn = ctx.Pipe()
        process = ctx.Process(target=target, args=(*make_args(round_), child_conn), daemon=True)
        process.start()
        return process, parent_conn

    outcomes, with_leftovers = Counter(), 0
    pending = spawn(0)
    for round_ in range(KILLS):
        process, conn = pending
        for step in ("write", "go"):
            assert conn.poll(60), f"the child did not answer (exit code {process.exitcode})"
            last = conn.recv()
            if step == "go":
                clean()  # the first write after the previous kill removed what that kill left behind
            conn.send(step)
        time.sleep(rng.uniform(0, max_delay))
        assert process.is_alive(), f"the child died by itself (exit code {process.exitcode})"
        os.kill(process.pid, signal.SIGKILL)
        process.join(30)
        assert process.exitcode == -signal.SIGKILL
        if round_ + 1 < KILLS:
            pending = spawn(round_ + 1)
        while conn.poll():
            try:
                last = conn.recv()
            except (EOFError, OSError):  # the killed child's end: closed, or reset with a message half-written
                break
        outcome, leftovers = after_kill(last)
        outcomes[outcome] += 1
        with_leftovers += leftovers
    return outcomes, with_leftovers


def leftovers_of(folder: Path, name: str, backup_allowed: bool = False) -> int:
    """Check that everything next to `name` besides its lock file is a temporary of `name` (or, with
    `backup_allowed`, the backup of an interrupted commit); count them."""
    others = listing(folder) - {name, f".{name}.xpeft-lock"}
    backup = {f".{name}.xpeft-old"} & others if backup_allowed else set()
    for other in others - backup:
        match = TEMP.fullmatch(other)
        assert match and match["name"] == name, f"unexpected file {other}"
    return len(others)


# -- killed writes ----------------------------------------------------------------------------------------------


def test_killed_save_pretrained_leaves_the_old_or_the_new_adapter(tmp_path):
    model = ether_model()
    references = {}
    for version in (0, 1):
        set_version(model, version)
        references[version] = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    parent = tmp_path / "work"
    folder = parent / "adapter"
    set_version(model, 0)
    model.save_pretrained(folder)
    (folder / "optimizer.pt").write_bytes(b"foreign")  # as in a Trainer checkpoint: must survive every save
    expected_files = {"README.md", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt"}

    def after_kill(_):
        # A kill during the commit leaves its backup (.adapter.xpeft-old); loading rolls the folder back first.
        left = leftovers_of(parent, "adapter", backup_allowed=True)
        loaded = get_peft_model_state_dict(PeftModel.from_pretrained(make_model("llama"), folder))
        assert not (parent / ".adapter.xpeft-old").exists()
        assert listing(folder) == expected_files
        assert (folder / "optimizer.pt").read_bytes() == b"foreign"
        version = int(json.loads((folder / "adapter_config.json").read_text())["revision"][-1])
        saved = load_file(folder / "adapter_model.safetensors")
        assert saved.keys() == references[version].keys()
        assert all(torch.equal(saved[k], references[version][k]) for k in saved), "tensors of another version"
        assert all(torch.equal(loaded[k], references[version][k]) for k in references[version])
        return f"version {version}", left > 0

    def clean():
        assert listing(parent) == {"adapter", ".adapter.xpeft-lock"}

    started = time.perf_counter()
    outcomes, left = kill_rounds(save_loop, lambda r: (str(folder), r % 2), after_kill, clean, 0.15, seed=1)
    set_version(model, 1)
    model.save_pretrained(folder)
    clean()
    assert sum(outcomes.values()) == KILLS and len(outcomes) == 2, outcomes
    print(
        f"save_pretrained: {KILLS} kills, {dict(outcomes)}, {left} left a temporary ({time.perf_counter() - started:.1f} s)"
    )


def test_killed_profile_store_add_leaves_the_old_or_the_new_store(tmp_path):
    path = tmp_path / "store.safetensors"
    ProfileStore.create(path, store_config(), layers=STORE_LAYERS)

    def after_kill(acknowledged):
        left = leftovers_of(tmp_path, "store.safetensors")
        store = ProfileStore(path)
        names = store.list()
        assert names == [f"p{i}" for i in range(len(names))]
        assert len(names) in (acknowledged, acknowledged + 1), (len(names), acknowledged)
        for i, name in enumerate(names):
            assert torch.equal(store.masks(name), store_payload(i))
        return ("old" if len(names) == acknowledged else "new"), left > 0

    def clean():
        assert listing(tmp_path) == {"store.safetensors", ".store.safetensors.xpeft-lock"}

    started = time.perf_counter()
    outcomes, left = kill_rounds(add_loop, lambda r: (str(path),), after_kill, clean, 0.1, seed=2)
    count = len(ProfileStore(path))
    ProfileStore(path).add({f"p{count}": store_payload(count)})
    clean()
    assert sum(outcomes.values()) == KILLS
    print(
        f"ProfileStore.add: {KILLS} kills, {dict(outcomes)}, {left} left a temporary, {count} profiles "
        f"({time.perf_counter() - started:.1f} s)"
    )


def test_killed_build_bank_leaves_the_old_or_the_new_bank(tmp_path):
    path = tmp_path / "bank.safetensors"
    fingerprints = [build_bank(bank_adapters(1), path), build_bank(bank_adapters(0), path)][::-1]  # file: version 0
    expected = []
    for version in (0, 1):
        adapters = bank_adapters(version)
        expected.append(
            {
                f"{layer}.{part}": torch.stack([adapter[layer][part] for adapter in adapters])
                for layer in adapters[0]
                for part in "AaBb"
            }
        )

    def after_kill(_):
        left = leftovers_of(tmp_path, "bank.safetensors")
        tensors, metadata = read_bank_file(path)  # checks every tensor against the recorded fingerprint
        version = fingerprints.index(metadata["fingerprint"])
        read = tensors.get(list(expected[version]))
        assert all(torch.equal(read[k], v) for k, v in expected[version].items())
        return f"version {version}", left > 0

    def clean():
        assert listing(tmp_path) == {"bank.safetensors", ".bank.safetensors.xpeft-lock"}

    started = time.perf_counter()
    outcomes, left = kill_rounds(bank_loop, lambda r: (str(path), r % 2), after_kill, clean, 0.2, seed=3)
    build_bank(bank_adapters(0), path)
    clean()
    assert sum(outcomes.values()) == KILLS and len(outcomes) == 2, outcomes
    size = path.stat().st_size / 1e6
    print(
        f"build_bank ({size:.1f} MB): {KILLS} kills, {dict(outcomes)}, {left} left a temporary "
        f"({time.perf_counter() - started:.1f} s)"
    )


# -- atomic files: modes, locks, stale temporaries --------------------------------------------------------------


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        file = atomic_save_file({"x": torch.ones(2)}, tmp_path / "x.safetensors")
        store = ProfileStore.create(tmp_path / "s.safetensors", store_config(), layers=STORE_LAYERS)
        build_bank(bank_adapters(0, count=1, d=8, r=2), tmp_path / "b.safetensors")
        assert [mode(p) for p in (file, store.path, tmp_path / "b.safetensors")] == [0o640] * 3
        os.umask(0o077)
        os.chmod(file, 0o604)
        atomic_save_file({"x": torch.zeros(2)}, file)
        store.add({"alice": store_payload(1)})
        build_bank(bank_adapters(1, count=1, d=8, r=2), tmp_path / "b.safetensors")
        assert [mode(p) for p in (file, store.path, tmp_path / "b.safetensors")] == [0o604, 0o640, 0o640]
        assert mode(atomic_save_file({"x": torch.ones(2)}, tmp_path / "new.safetensors")) == 0o600
    finally:
        os.umask(previous)


def test_stale_temporaries_of_the_same_path_are_removed_under_the_lock(tmp_path):
    stale_file = tmp_path / f".x.safetensors.xpeft-tmp-{'0' * 32}"
    stale_folder = tmp_path / f".x.safetensors.xpeft-tmp-{'a' * 32}"
    stale_file.write_bytes(b"half a write")
    (stale_folder / "sub").mkdir(parents=True)
    (stale_folder / "sub" / "f").write_bytes(b"x")
    kept = [
        tmp_path / ".x.safetensors.xpeft-tmp-zz",  # not the pattern
        tmp_path / f".y.safetensors.xpeft-tmp-{'0' * 32}",  # another file's
        tmp_path / f"x.safetensors.xpeft-tmp-{'0' * 32}",  # not hidden
    ]
    for path in kept:
        path.write_bytes(b"keep")
    atomic_save_file({"x": torch.ones(2)}, tmp_path / "x.safetensors")
    assert listing(tmp_path) == {"x.safetensors", ".x.safetensors.xpeft-lock"} | {p.name for p in kept}


def test_a_write_waits_for_the_lock_on_its_path(tmp_path):
    path = tmp_path / "x.safetensors"
    lock = FileLock(tmp_path / ".x.safetensors.xpeft-lock")  # as another process holding it would
    lock.acquire()
    writer = threading.Thread(target=atomic_save_file, args=({"x": torch.ones(2)}, path))
    try:
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and not path.exists(), "the write did not wait for the lock"
    finally:
        lock.release()
    writer.join(30)
    assert load_file(path)["x"].equal(torch.ones(2))


# -- crash-safe save_pretrained ---------------------------------------------------------------------------------


def test_save_pretrained_replaces_the_adapter_and_keeps_everything_else(tmp_path):
    model = ether_model()
    folder = tmp_path / "checkpoint-10"
    set_version(model, 0)
    model.save_pretrained(folder)
    (folder / "optimizer.pt").write_bytes(b"optimizer")
    (folder / "runs").mkdir()
    (folder / "runs" / "events").write_bytes(b"log")
    (folder / "latest").symlink_to("optimizer.pt")
    readme = folder / "README.md"
    readme.write_text(readme.read_text() + "\nMy own notes.\n")
    os.chmod(folder, 0o750)
    inode = (folder / "optimizer.pt").stat().st_ino
    set_version(model, 1)
    model.save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["revision"] == "version-1"
    saved = load_file(folder / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in get_peft_model_state_dict(model).items())
    assert (folder / "optimizer.pt").read_bytes() == b"optimizer"
    assert (folder / "optimizer.pt").stat().st_ino == inode, "linked, not copied"
    assert (folder / "runs" / "events").read_bytes() == b"log"
    assert os.readlink(folder / "latest") == "optimizer.pt"
    assert "My own notes." in readme.read_text() and "library_name: peft" in readme.read_text()
    assert mode(folder) == 0o750
    assert listing(tmp_path) == {"checkpoint-10", ".checkpoint-10.xpeft-lock"}


def test_save_pretrained_of_selected_adapters_keeps_the_others(tmp_path):
    model = ether_model(adapters=("default", "other"))
    set_version(model, 0, "default")
    set_version(model, 0, "other")
    folder = tmp_path / "adapters"
    model.save_pretrained(folder)
    default_bytes = (folder / "adapter_model.safetensors").read_bytes()
    set_version(model, 1, "default")  # not saved below: the folder must keep version 0 of it
    set_version(model, 1, "other")
    model.save_pretrained(folder, selected_adapters=["other"])
    assert (folder / "adapter_model.safetensors").read_bytes() == default_bytes
    loaded = PeftModel.from_pretrained(make_model("llama"), folder)
    loaded.load_adapter(folder / "other", adapter_name="other")
    assert loaded.peft_config["default"].revision == "version-0"
    assert loaded.peft_config["other"].revision == "version-1"
    for name in ("other",):
        expected = get_peft_model_state_dict(model, adapter_name=name)
        actual = get_peft_model_state_dict(loaded, adapter_name=name)
        assert all(torch.equal(actual[k], v) for k, v in expected.items())
    with pytest.raises(ValueError, match="invalid `selected_adapters`"):  # peft's own check still runs
        model.save_pretrained(folder, selected_adapters=["nope"])


def test_only_xpeft_adapters_take_the_crash_safe_path(tmp_path, monkeypatch):
    calls = []
    save_folder = saving.save_folder
    monkeypatch.setattr(saving, "save_folder", lambda save, folder: calls.append(folder) or save_folder(save, folder))
    saving.install()
    saving.install()  # idempotent: still one wrapper around peft's own method
    original = PeftModel.save_pretrained.__wrapped__
    assert original.__module__ == "peft.peft_model" and not hasattr(original, "__xpeft_original__")
    lora = get_peft_model(make_model("llama"), LoraConfig(r=2, task_type=task_type("llama")))
    lora.save_pretrained(tmp_path / "lora")
    assert calls == [] and (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert ".lora.xpeft-lock" not in listing(tmp_path)
    model = ether_model()
    model.save_pretrained(tmp_path / "ether", is_main_process=False)  # another rank: writes nothing
    assert calls == [] and not (tmp_path / "ether").exists()
    model.save_pretrained(tmp_path / "ether")
    assert calls == [(tmp_path / "ether").resolve()]


def test_an_interrupted_commit_is_rolled_back_by_the_next_load_or_save(tmp_path, monkeypatch):
    """A process that dies in the middle of the commit (some files replaced, its backup still there) leaves an old
    adapter that the next load or save puts back, whole."""
    model = ether_model()
    folder = tmp_path / "adapter"
    set_version(model, 0)
    model.save_pretrained(folder)

    def loaded_version(peft_model, name="default"):
        return int(peft_model.peft_config[name].revision[-1])

    def die_in_the_commit():
        replace, calls = os.replace, []

        def replace_once(source, target):
            calls.append(target)
            if len(calls) > 1:
                raise SystemExit("killed")  # the weights are replaced, the config is not
            return replace(source, target)

        monkeypatch.setattr(saving.os, "replace", replace_once)
        monkeypatch.setattr(saving, "recover_folder", lambda folder: None)  # a dead process cleans nothing up
        set_version(model, 1)
        with pytest.raises(SystemExit):
            model.save_pretrained(folder)
        monkeypatch.undo()
        assert (tmp_path / ".adapter.xpeft-old").is_dir()
        assert json.loads((folder / "adapter_config.json").read_text())["revision"] == "version-0"

    die_in_the_commit()
    assert loaded_version(PeftModel.from_pretrained(make_model("llama"), folder)) == 0
    assert listing(tmp_path) == {"adapter", ".adapter.xpeft-lock"}
    die_in_the_commit()
    model.load_adapter(folder, adapter_name="again")
    assert loaded_version(model, "again") == 0
    die_in_the_commit()
    set_version(model, 1)
    model.save_pretrained(folder)
    assert loaded_version(PeftModel.from_pretrained(make_model("llama"), folder)) == 1
    assert listing(tmp_path) == {"adapter", ".adapter.xpeft-lock"}


def test_files_written_into_the_folder_during_a_save_survive(tmp_path, monkeypatch):
    """Other processes write into a checkpoint folder while rank 0 saves the adapter there (Trainer's
    `rng_state_<rank>.pth`, DeepSpeed shards): the save replaces only its own files."""
    model = ether_model()
    folder = tmp_path / "checkpoint-5"
    commit = saving._commit

    def commit_while_another_rank_writes(staged, target):
        (target / "rng_state_1.pth").write_bytes(b"rank 1")
        return commit(staged, target)

    monkeypatch.setattr(saving, "_commit", commit_while_another_rank_writes)
    model.save_pretrained(folder)
    model.save_pretrained(folder)
    assert (folder / "rng_state_1.pth").read_bytes() == b"rank 1"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= listing(folder)


def test_a_new_weights_format_removes_the_stale_one(tmp_path):
    """Saving `.bin` weights over a folder with `.safetensors` ones removes the latter (peft would load it first)."""
    model = ether_model()
    folder = tmp_path / "adapter"
    set_version(model, 0)
    model.save_pretrained(folder)
    set_version(model, 1)
    model.save_pretrained(folder, safe_serialization=False)
    assert not (folder / "adapter_model.safetensors").exists() and (folder / "adapter_model.bin").is_file()
    assert PeftModel.from_pretrained(make_model("llama"), folder).peft_config["default"].revision == "version-1"


def test_saving_into_the_working_folder_keeps_the_process_in_it(tmp_path, monkeypatch):
    model = ether_model()
    (tmp_path / "adapter").mkdir()
    monkeypatch.chdir(tmp_path / "adapter")
    model.save_pretrained(".")
    model.save_pretrained(".")
    Path("note.txt").write_text("here")  # in the old, deleted tree this would fail
    assert (tmp_path / "adapter" / "note.txt").read_text() == "here"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    (tmp_path / "gone").mkdir()
    os.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()
    model.save_pretrained(tmp_path / "elsewhere")  # a deleted working folder does not stop a save
    assert (tmp_path / "elsewhere" / "adapter_model.safetensors").is_file()


# -- corrupt files are named ------------------------------------------------------------------------------------


def test_corrupt_bank_errors_name_the_file_and_say_to_rebuild_it(tmp_path):
    path = tmp_path / "bank.safetensors"
    build_bank(bank_adapters(0, count=2, d=32, r=8), path)
    intact = path.read_bytes()
    named = re.escape(str(path))
    path.write_bytes(intact[:-100])
    with pytest.raises(ValueError, match=named + r".*truncated or corrupted\. Re-create it"):
        read_bank_file(path)
    path.write_bytes(intact[:6])
    with pytest.raises(ValueError, match=named + r".*truncated or corrupted\. Re-create it"):
        read_bank_file(path)
    path.write_bytes(intact[:-4] + bytes(4))  # same size, other bytes
    with pytest.raises(ValueError, match=f"Bank file {named} is corrupted.*Rebuild it with `xpeft.x_peft.build_bank`"):
        read_bank_file(path)
    path.write_bytes(intact[:-100])
    config = XPeftConfig(bank=str(path), bank_size=2, reduction_factor=4, task_type=task_type("llama"))
    with pytest.raises(ValueError, match=named + r".*truncated or corrupted"):
        get_peft_model(make_model("llama"), config)


def test_a_load_overlapping_a_save_of_the_same_folder_is_refused(tmp_path):
    """peft reads a folder's config and its weights separately: a save between the two reads would pair one version's
    config with the other's weights, silently. The load is refused and says to load again."""
    model = ether_model()
    folder = tmp_path / "adapter"
    set_version(model, 0)
    model.save_pretrained(folder)
    config = EtherConfig.from_pretrained(folder)  # the config of version 0 is read ...
    set_version(model, 1)
    model.save_pretrained(folder)  # ... a save replaces the folder's files ...
    with pytest.raises(ValueError, match=r"changed while it was being loaded.*Load it again"):
        PeftModel.from_pretrained(make_model("llama"), folder, config=config)  # ... before its weights are read
    assert PeftModel.from_pretrained(make_model("llama"), folder).peft_config["default"].revision == "version-1"
