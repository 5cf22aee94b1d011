"""Shared fixtures: the real data folder, the embedded model, tiny random models of several families."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, which may be by any test module
# (torch.compile imports it): set it before collection so the interpreter-mode kernel tests
# run on CPU-only machines instead of skipping.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton.runtime.interpreter as _interp
    except ImportError:  # pragma: no cover - installs without triton
        _interp = None
    if _interp is not None:
        _orig_patch = _interp._patch_lang_tensor

        def _patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
            # Triton 3.6 turns a scalar into a 1-element array and calls int() on it (range()
            # over a runtime bound), which numpy 2.4 rejects; take the element explicitly.
            _orig_patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interp._patch_lang_tensor = _patch_lang_tensor

# Under pytest-xdist each worker's torch would start one thread per core (4 threads on CI's 2
# cores with -n 2): give each worker its share, and its subprocesses (the CLI, kill-and-resume
# runs) the same through OMP_NUM_THREADS.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(_share)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUANTLAB_DATA_DIR", REPO.parent / "shared" / "data"))

# Small but structurally faithful: GQA (4 heads, 2 KV heads), 2 layers, the real SmolLM2 tokenizer.
TINY = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
}


def require_data(relpath: str) -> Path:
    """Path of a file under the shared data folder; fails under CI=true when missing, else skips."""
    p = DATA / relpath
    if not p.is_file():
        msg = f"missing shared data file {p} (set QUANTLAB_DATA_DIR or check out ../shared/data)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture(scope="session")
def data_file() -> Callable[[str], Path]:
    """require_data as a fixture, for test modules (imported in importlib mode, they cannot import conftest)."""
    return require_data


@pytest.fixture(scope="session")
def emma() -> Path:
    return require_data("austen/emma.txt")


@pytest.fixture(scope="session")
def pride() -> Path:
    return require_data("austen/prideandprejudice.txt")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from quantlab.models import embedded_model_dir

    return embedded_model_dir()


def _tiny_folder(
    cls_name: str, kw: dict[str, object], tok: Any, out: Path, perturb_norms: bool = False
) -> Path:
    """Save a random 2-layer model of transformers config class cls_name (4 heads, 2 KV heads
    unless kw says otherwise; seed 0) with tok into out. perturb_norms: norm weights (random init
    leaves them at 1, or 0 for Gemma's 1 + w) get noise, so folds into them are really tested."""
    import transformers
    from transformers import AutoModelForCausalLM

    base = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = getattr(transformers, cls_name)(
        vocab_size=len(tok), bos_token_id=0, eos_token_id=2, **{**base, **kw}
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if perturb_norms:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(
    tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path
) -> Callable[[str], Path]:
    """Factory: family name -> folder of a random-init tiny model of that family (cached per session)."""
    from transformers import AutoTokenizer

    made: dict[str, Path] = {}
    tok = AutoTokenizer.from_pretrained(str(embedded_dir))

    def make(family: str) -> Path:
        if family in made:
            return made[family]
        cls_name, extra = TINY[family]
        kw: dict[str, object] = {
            "hidden_size": 128,
            "intermediate_size": 256,
            "max_position_embeddings": 512,
            "tie_word_embeddings": family == "llama",
            **extra,
        }
        made[family] = _tiny_folder(cls_name, kw, tok, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]

    return make


# One tiny random config per adapter architecture, each keeping its family's quirks: GQA (and a
# single KV head for Gemma), sliding windows shorter than the test windows, Gemma's softcapping and
# query scalar, Llama 3's rope scaling and tied embeddings, experts. Norm weights are perturbed.
ARCH_TINY: dict[str, tuple[str, dict[str, object]]] = {
    "llama3": (
        "LlamaConfig",
        {
            "tie_word_embeddings": True,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "gemma2": (
        "Gemma2Config",
        {
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 16,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {
            "num_key_value_heads": 1,
            "head_dim": 16,
            "sliding_window": 16,
            "query_pre_attn_scalar": 24,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_local_base_freq": 10000.0,
        },
    ),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    ),
}


@pytest.fixture(scope="session")
def tiny_arch(
    tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path
) -> Callable[[str], Path]:
    """Factory: ARCH_TINY key -> folder of that architecture's tiny random model (cached)."""
    from transformers import AutoTokenizer

    made: dict[str, Path] = {}
    tok = AutoTokenizer.from_pretrained(str(embedded_dir))

    def make(arch: str) -> Path:
        if arch in made:
            return made[arch]
        cls_name, extra = ARCH_TINY[arch]
        kw = {"hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 256, **extra}
        out = tmp_path_factory.mktemp(f"arch-{arch}")
        made[arch] = _tiny_folder(cls_name, kw, tok, out, perturb_norms=True)
        return made[arch]

    return make


def _perplexity(model: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    import math

    import torch.nn.functional as F

    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w.view(1, -1)).logits[0, :-1].float()
            nll -= float(F.log_softmax(logits, -1).gather(-1, w[1:, None]).sum())
            n += w.numel() - 1
    return math.exp(nll / n)


@pytest.fixture(scope="session")
def perplexity() -> Callable[[torch.nn.Module, list[torch.Tensor]], float]:
    """(model, windows [L] int64) -> perplexity over every predicted token of the windows."""
    return _perplexity


def _modelopt_export(
    model_dir: Path, cfg_name: str, block: int | None, kv: bool, out: Path
) -> Path:
    """ModelOpt's own quantize + export_hf_checkpoint of model_dir (fp16, 2 random windows)."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float16)
    cfg: dict[str, Any] = copy.deepcopy(getattr(mtq, cfg_name))
    for entry in cfg["quant_cfg"]:
        if block and entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"] = {-1: block, "type": "static"}
    if kv:
        cfg["quant_cfg"] += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for row in ids:
                m(row[None])

    model = mtq.quantize(model, cfg, forward_loop)
    export_hf_checkpoint(model, export_dir=str(out))
    return out


@pytest.fixture(scope="session")
def modelopt_export() -> Callable[[Path, str, int | None, bool, Path], Path]:
    """ModelOpt's own export of a model folder: (folder, mtq config name, block, FP8 KV, out)."""
    return _modelopt_export


def _tensor_layout(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    from safetensors import safe_open

    from quantlab.export.check_hf import ST_DTYPES

    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open is not a dict
                t = h.get_slice(k)
                out[k] = (ST_DTYPES[t.get_dtype()], tuple(t.get_shape()))
    return out


@pytest.fixture(scope="session")
def tensor_layout() -> Callable[[Path], dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """folder -> {tensor name: (dtype, shape)} over its safetensors files."""
    return _tensor_layout
