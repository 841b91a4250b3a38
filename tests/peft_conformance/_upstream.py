"""Find peft's own generic tests in its source distribution and import them, without copying them into the repo.

`.ci/run` downloads the sdist once (`pip download peft==<installed> --no-binary :all: --no-deps -d DIR`) and points
`XPEFT_PEFT_SDIST` at the archive. The three files the generic tests need are extracted to a temporary directory as
the package `peft_upstream_tests`, so that their relative imports work and nothing named `tests` is shadowed.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import shutil
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft

PACKAGE = "peft_upstream_tests"
FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")
SDIST_ENV = "XPEFT_PEFT_SDIST"
DEFAULT_SDIST = Path.home() / ".cache" / "xpeft" / "peft-sdist" / f"peft-{peft.__version__}.tar.gz"
DOWNLOAD_HINT = (
    f"pip download peft=={peft.__version__} --no-binary :all: --no-deps -d {DEFAULT_SDIST.parent} "
    f"(or set {SDIST_ENV} to the peft-{peft.__version__}.tar.gz you have)"
)


class SdistMissing(Exception):
    """No sdist where one was looked for; the message says how to get it."""


def sdist_path() -> Path:
    """The archive named by `XPEFT_PEFT_SDIST`, else the default cache location.

    Raises:
        SdistMissing: when neither exists.
        FileNotFoundError: when `XPEFT_PEFT_SDIST` names a file that does not exist (a CI misconfiguration, which
            must fail rather than skip).
    """
    explicit = os.environ.get(SDIST_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{SDIST_ENV}={explicit} does not exist. Get it with: {DOWNLOAD_HINT}.")
        return path
    if not DEFAULT_SDIST.is_file():
        raise SdistMissing(f"peft's sdist is not at {DEFAULT_SDIST}. Get it with: {DOWNLOAD_HINT}.")
    return DEFAULT_SDIST


def _extract(archive: Path) -> Path:
    """Extract FILES from the archive's `tests/` into a fresh temporary package directory; return its parent."""
    root = Path(tempfile.mkdtemp(prefix="xpeft-peft-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    package = root / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    with tarfile.open(archive) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if Path(m.name).parent.name == "tests"}
        top = Path(tar.getmembers()[0].name).parts[0]
        if top != f"peft-{peft.__version__}":
            raise RuntimeError(
                f"{archive} holds {top}, but peft {peft.__version__} is installed: the generic tests must come from the "
                f"installed release. Get the matching sdist with: {DOWNLOAD_HINT}."
            )
        for name in FILES:
            if name not in members:
                raise RuntimeError(f"{archive} has no tests/{name}; it is not a peft source distribution.")
            source = tar.extractfile(members[name])
            (package / name).write_bytes(source.read())
    return root


def _stub_optional_imports() -> None:
    """peft's test helpers import `diffusers` and `datasets` at module level, for tests that need the Hub (stable
    diffusion pipelines, datasets). The generic custom-model tests use neither, so inert stand-ins are enough; one
    that is actually called fails loudly instead of reaching the network."""

    def unavailable(*args, **kwargs):
        raise RuntimeError("xpeft's peft conformance run has no `datasets`/`diffusers` and no Hub access.")

    if "diffusers" not in sys.modules and importlib.util.find_spec("diffusers") is None:
        diffusers = types.ModuleType("diffusers")
        diffusers.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {"__init__": unavailable})
        sys.modules["diffusers"] = diffusers
    if "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None:
        datasets = types.ModuleType("datasets")
        datasets.load_dataset = unavailable
        sys.modules["datasets"] = datasets


def load_custom_model_tests() -> types.ModuleType:
    """Import peft's `tests/test_custom_models.py` from the sdist (see the module docstring)."""
    if PACKAGE + ".test_custom_models" in sys.modules:
        return sys.modules[PACKAGE + ".test_custom_models"]
    root = _extract(sdist_path())
    _stub_optional_imports()
    sys.path.insert(0, str(root))
    return importlib.import_module(PACKAGE + ".test_custom_models")
