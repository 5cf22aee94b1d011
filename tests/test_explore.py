"""quantlab.explore: the moments behind the kurtosis, the migrated ranges, and the hooks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from quantlab.explore import InputStats, input_stats, linear_sample, migrated_amax
from quantlab.state import FOLD_IN, ModuleState, QuantState


def _stats(x: torch.Tensor) -> InputStats:
    x = x.double()
    return InputStats(
        x.abs().amax(dim=0).float(),
        x.numel(),
        float(x.sum()),
        float((x**2).sum()),
        float((x**3).sum()),
        float((x**4).sum()),
    )


def test_kurtosis_of_known_distributions() -> None:
    """Gaussian 3, Laplace 6, a shifted Gaussian still 3 (central moments), one outlier column large."""
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(200_000, 4, generator=g)
    assert abs(_stats(normal).kurtosis - 3.0) < 0.05
    assert abs(_stats(normal + 5.0).kurtosis - 3.0) < 0.05
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((200_000, 4))
    assert abs(_stats(laplace).kurtosis - 6.0) < 0.3
    spiky = normal.clone()
    spiky[::1000, 0] = 60.0
    st = _stats(spiky)
    assert st.kurtosis > 100 and int(st.amax.argmax()) == 0
    assert st.max_over_median > 10


def test_input_stats_and_migration_on_a_tiny_model(
    tiny_model: Callable[[str], Path], embedded_dir: Path
) -> None:
    """Every decoder linear is seen, BOS is left out, and folds divide the per-channel range."""
    from quantlab.models import load_model

    model, _ = load_model(str(tiny_model("llama")))
    windows = [torch.randint(3, 1000, (33,)), torch.randint(3, 1000, (17,))]
    stats = input_stats(model, windows)
    assert len(stats) == 2 * 7
    q = stats["model.layers.0.self_attn.q_proj"]
    assert q.amax.shape == (128,) and q.count == (32 + 16) * 128
    w, xs = linear_sample(model, windows, "model.layers.0.self_attn.q_proj")
    assert w.shape == (128, 128) and xs.shape == (48, 128)
    assert torch.equal(xs.abs().amax(dim=0), q.amax)
    s = torch.rand(128) + 0.5
    state = QuantState(
        modules={"model.layers.0.self_attn.q_proj": ModuleState(tensors={FOLD_IN: s})}
    )
    moved = migrated_amax(stats, state)
    assert list(moved) == ["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(moved["model.layers.0.self_attn.q_proj"], q.amax / s)
