"""The evaluation assets: moved to the public module `xpeft.datasets`; this name stays for the benchmark scripts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from xpeft.datasets import *  # noqa: E402, F403
from xpeft.datasets import (  # noqa: E402, F401  (names outside __all__ that the scripts and tests use)
    CHATTERBOT,
    DEFAULT_SEED,
    DEFAULT_TEST_FRACTION,
    MINILM,
    SMOLLM2,
    SPAM,
    mail_to_text,
    sha256_file,
    sha256_files,
)
