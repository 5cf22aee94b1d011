"""Recipe schema, overrides and the CLI's bad-input contract: one clear message, exit code 2, no output left."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from quantlab.cli import main
from quantlab.errors import InputError
from quantlab.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

GOOD = """\
name: t
model:
  source: embedded:smollm2
steps:
  - calibrator: rtn
    args:
      format: int4_g64_sym
export:
  output_dir: out/t
evaluation:
  enabled: false
"""


def test_recipes_folder_has_every_mode() -> None:
    names = {p.stem for p in RECIPES}
    assert {
        "smollm2_int8_wo",
        "smollm2_int4_wo",
        "smollm2_int4_g64_sym",
        "smollm2_int4_g64_asym",
        "smollm2_fp8",
        # every seed mode and combination the calibrators issue lists
        "smollm2_int4_g64_awq_sym",
        "smollm2_int4_g64_gptq_asym",
        "smollm2_int4_g64_awq_gptq_sym",
        "smollm2_int8_sq",
        "smollm2_int8_sq_token",
        "smollm2_fp8_fp8kv",
        "smollm2_int4_g64_awq_int8kv",
        "smollm2_int8_sq_int8kv",
        "smollm2_int8_wo_int8kv",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe, base = load_recipe(path)
    assert recipe.steps and base == path.parent
    if recipe.calibration is not None and recipe.calibration.source == "file":
        assert recipe.calibration.path and recipe.calibration.path.endswith(".txt")


def test_set_overrides_nested_keys_and_list_items(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(GOOD)
    r, _ = load_recipe(
        p, ["export.tp_size=3", "steps.0.args.format=int8_channel", "runner.exclude=[foo]"]
    )
    assert (
        r.export.tp_size == 3
        and r.steps[0].args == {"format": "int8_channel"}
        and r.runner.exclude == ["foo"]
    )
    with pytest.raises(InputError, match=re.escape("expected path.to.key=value")):
        load_recipe(p, ["export.tp_size"])
    with pytest.raises(InputError, match=re.escape("--set: export.tp_size")):
        load_recipe(p, ["export.tp_size=zero"])


def test_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("out/t", "${QL_TEST_OUT:-fallback}/t"))
    assert load_recipe(p)[0].export.output_dir == "fallback/t"
    monkeypatch.setenv("QL_TEST_OUT", "/x")
    assert load_recipe(p)[0].export.output_dir == "/x/t"
    p.write_text(GOOD.replace("out/t", "${QL_SURELY_UNSET_VAR}/t"))
    with pytest.raises(InputError, match="QL_SURELY_UNSET_VAR is not set"):
        load_recipe(p)


def run_cli(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str]:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    code = main(["--quiet", "run", str(p), *extra])
    return code, capsys.readouterr().err


def assert_nothing_written(tmp_path: Path) -> None:
    # Only the recipe itself: no output directory, no temporary directory left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(
        tmp_path, GOOD.replace("  output_dir: out/t", "  output_dir: out/t\n  tp_sise: 2"), capsys
    )
    assert code == 2
    assert "recipe.yaml:line 10: export.tp_sise: unknown key 'tp_sise'; allowed keys:" in err
    assert "tp_size" in err and "pp_size" in err
    assert_nothing_written(tmp_path)


def test_unknown_calibrator_arg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(
        tmp_path, GOOD.replace("format: int4_g64_sym", "fromat: int4_g64_sym"), capsys
    )
    assert code == 2
    assert (
        "line 7: steps.0.args.fromat: unknown key 'fromat'; allowed keys: format, scale_method [calibrator 'rtn']"
        in err
    )
    assert_nothing_written(tmp_path)


def test_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(
        tmp_path, GOOD.replace("  output_dir: out/t", "  output_dir: out/t\n  tp_size: two"), capsys
    )
    assert code == 2
    assert "line 10: export.tp_size: Input should be a valid integer" in err and "'two'" in err
    assert_nothing_written(tmp_path)


def test_wrong_literal_lists_allowed_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(
        tmp_path,
        GOOD.replace("source: embedded:smollm2", "source: embedded:smollm2\n  dtype: fp12"),
        capsys,
    )
    assert code == 2
    assert "line 4: model.dtype:" in err and "'float32', 'float16' or 'bfloat16'" in err
    assert_nothing_written(tmp_path)


def test_unknown_format_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(tmp_path, GOOD.replace("int4_g64_sym", "int3_g64"), capsys)
    assert (
        code == 2
        and "'int3_g64' is not an integer weight format; use one of" in err
        and "int4_g64_asym" in err
    )


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(
        tmp_path, GOOD.replace("embedded:smollm2", "./models/does-not-exist"), capsys
    )
    assert code == 2
    assert "does-not-exist" in err and "does not exist" in err
    assert_nothing_written(tmp_path)


def test_tp_that_does_not_divide_kv_heads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], embedded_dir: Path
) -> None:
    code, err = run_cli(tmp_path, GOOD, capsys, "--set", "export.tp_size=2")
    assert code == 2
    assert "tp_size 2 does not divide num_key_value_heads = 3" in err
    assert "Valid tp_size values for this model and format: 1, 3" in err
    assert_nothing_written(tmp_path)


def test_group_size_that_does_not_divide_576(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], embedded_dir: Path
) -> None:
    code, err = run_cli(tmp_path, GOOD.replace("int4_g64_sym", "int4_g128_sym"), capsys)
    assert code == 2
    assert (
        "group size 128 does not divide the input dimension K = 576 of layers.*.self_attn.q_proj"
        in err
    )
    assert "Group sizes that divide every input dimension (576, 1536): 32, 64" in err
    assert_nothing_written(tmp_path)


def test_validate_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, RECIPES)]) == 0
    assert capsys.readouterr().out.count(": ok (") == len(RECIPES)


def test_yaml_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(tmp_path, "name: [unclosed\n", capsys)
    assert code == 2 and "not valid YAML" in err
    assert yaml  # the loader in use


def test_missing_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
