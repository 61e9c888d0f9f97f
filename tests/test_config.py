"""Configuration discovery and validation, and baselines (files read and written for real in tmp_path)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from bncheck import baseline, config
from bncheck.errors import UsageError
from bncheck.findings import Finding, Severity


def _finding(code: str, layer: str) -> Finding:
    return Finding(code, "x", Severity.ERROR, layer, "m", "h")


def test_pyproject_table_is_found_from_a_subfolder(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.bncheck]\nfail-on = "warning"\nselect = ["BN002"]\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    found = config.find(sub)
    assert found == tmp_path / "pyproject.toml"
    cfg = config.load(found)
    assert cfg.fail_on == "warning" and cfg.select == ("BN002",)


# broken TOML after the first: a pyproject.toml that never mentions bncheck, or lists it only as a dependency or
# a script name, is not parsed, so not an error either
@pytest.mark.parametrize(
    "pyproject",
    [
        '[project]\nname = "x"\n',
        "[project\nname = 'x'\n",
        '[project]\ndependencies = ["bncheck>=0.1"]\n[project.scripts]\nbncheck = "bncheck.cli:main"\n[tool.ruff\n',
    ],
)
def test_pyproject_without_the_table_is_skipped_for_one_further_up(tmp_path, pyproject):
    (tmp_path / "bncheck.toml").write_text('ignore = ["BN004"]\n')
    inner = tmp_path / "proj"
    inner.mkdir()
    (inner / "pyproject.toml").write_text(pyproject)
    assert config.find(inner) == tmp_path / "bncheck.toml"


@pytest.mark.parametrize(
    "table",
    [
        '[ "tool" . \'bncheck\' ]\nfail-on = "warning"\n',
        'tool.bncheck.fail-on = "warning"\n',
        '[tool]\nbncheck = { fail-on = "warning" }\n',
        'tool = { bncheck = { fail-on = "warning" } }\n',
        '[tool.ruff]\nline-length = 1\n\n[tool.bncheck.per-layer-ignores]\n"x" = ["BN004"]\n[tool.bncheck]\nfail-on = "warning"\n',
    ],
)
def test_every_toml_spelling_of_the_table_is_found(tmp_path, table):
    # root keys first: after a [project] header a dotted key would belong to that table
    (tmp_path / "pyproject.toml").write_text(table + '\n[project]\ndependencies = ["bncheck"]\n')
    assert config.discover(None, str(tmp_path)).fail_on == "warning"


def test_bncheck_toml_wins_over_pyproject_in_the_same_folder(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.bncheck]\nfail-on = "info"\n')
    (tmp_path / "bncheck.toml").write_text('fail-on = "never"\n')
    assert config.discover(None, str(tmp_path)).fail_on == "never"


def test_no_file_means_no_settings(tmp_path):
    assert config.find(tmp_path) is None
    assert config.discover(None, str(tmp_path)) == config.Config()


def test_unknown_keys_are_a_usage_error_naming_a_few(tmp_path):
    path = tmp_path / "bncheck.toml"
    path.write_text("".join(f"k{i} = 1\n" for i in range(10)))
    with pytest.raises(UsageError, match=r"unknown key\(s\) 'k0', 'k1', 'k2' and 7 more"):
        config.load(path)


def test_bad_fail_on_and_bad_toml_are_usage_errors(tmp_path):
    path = tmp_path / "bncheck.toml"
    path.write_text('fail-on = "sometimes"\n')
    with pytest.raises(UsageError, match="fail-on"):
        config.load(path)
    path.write_text("select = [\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        config.load(path)
    path.write_bytes(b'fail-on = "\xff"\n')  # not UTF-8, as TOML must be
    with pytest.raises(UsageError, match="not valid TOML"):
        config.load(path)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("batch-sizes = [1, 0]\n", "batch-sizes: 0 is not a positive batch size"),
        ('ignore = ["BN999"]\n', "ignore: unknown check 'BN999'"),
        ('[per-layer-ignores]\n"head*" = ["stale"]\n', "per-layer-ignores.'head*': unknown check 'stale'"),
        ('[per-model."*.onnx"]\ninput-shape = ["x:3xa"]\n', "per-model.'*.onnx'.input-shape: --input-shape 'x:3xa'"),
    ],
)
def test_a_value_the_command_line_would_refuse_is_refused_naming_the_file_and_key(tmp_path, text, said):
    # they were refused by probe only, as if given with --batch-sizes, or without the file's name, or never
    path = tmp_path / "bncheck.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: {said}")


def test_per_model_settings_match_by_glob_and_resolve_data_next_to_the_file(tmp_path):
    path = tmp_path / "bncheck.toml"
    path.write_text(
        '[per-model."models/*.onnx"]\ninput-shape = ["x:3x32x32"]\ndata = "calib.npz"\nbatch-sizes = [1, 8]\n'
    )
    cfg = config.load(path)
    entry = cfg.for_model(str(tmp_path / "models" / "a.onnx"))
    assert entry is not None and entry.input_shapes == ("x:3x32x32",) and entry.batch_sizes == "1,8"
    assert entry.data == str(tmp_path / "calib.npz")
    assert cfg.for_model(str(tmp_path / "other" / "a.keras")) is None


def test_per_layer_ignores_glob_on_layer_names(tmp_path):
    path = tmp_path / "bncheck.toml"
    path.write_text('[per-layer-ignores]\n"backbone/*" = ["BN004", "stale-stats"]\n')
    cfg = config.load(path)
    from bncheck.checks import resolve

    assert cfg.ignored(_finding("BN004", "backbone/bn1"), resolve)
    assert cfg.ignored(_finding("BN003", "backbone/bn1"), resolve)
    assert not cfg.ignored(_finding("BN002", "backbone/bn1"), resolve)
    assert not cfg.ignored(_finding("BN004", "head/bn"), resolve)


def test_baseline_round_trip_hides_known_findings_and_lists_gone_ones(tmp_path):
    path = str(tmp_path / "baseline.json")
    count = baseline.write(path, [("models/a.onnx", [_finding("BN003", "bn1"), _finding("BN004", "bn2")])])
    assert count == 2
    recorded = baseline.read(path)
    applied = baseline.apply(recorded, "elsewhere/a.onnx", [_finding("BN003", "bn1"), _finding("BN002", "bn3")])
    assert [f.code for f in applied.kept] == ["BN002"]
    assert [f.code for f in applied.suppressed] == ["BN003"]
    assert applied.gone == [("a.onnx", "BN004", "bn2")]


def test_baseline_file_gets_the_umask_permissions(tmp_path):
    path = tmp_path / "baseline.json"
    previous = os.umask(0o022)
    try:
        baseline.write(str(path), [("a.onnx", [_finding("BN003", "bn1")])])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.json"]


def test_a_file_that_is_not_a_baseline_is_refused(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"findings": []}))
    with pytest.raises(UsageError, match="not a bncheck baseline"):
        baseline.read(str(path))


def test_broken_pyproject_that_mentions_bncheck_is_still_an_error(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.bncheck\nfail-on = 'x'\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        config.find(tmp_path)


def test_fix_reads_the_configurations_fail_on_and_per_model_data(tmp_path, monkeypatch):
    """fix read no configuration: with fail-on = "warning" it passed a model probe then failed, and a per-model
    data file probe used was not found ("no calibration data")."""
    import shutil

    from click.testing import CliRunner

    from bncheck.cli import main

    samples = os.path.join(os.path.dirname(__file__), "..", "sample_models")
    for name in ("epsilon_1e-8.onnx", "stale_drift.onnx", "calib_drift.npz"):
        shutil.copy(os.path.join(samples, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    fixed = ["fix", "epsilon_1e-8.onnx", "-o", "e.onnx"]
    assert CliRunner().invoke(main, fixed).exit_code == 0  # its BN004 warning remains: no fix changes an epsilon
    drift = ["fix", "stale_drift.onnx", "-o", "s.onnx", "--format", "json"]
    assert json.loads(CliRunner().invoke(main, drift).stdout)["fix"]["changed"] is False
    # the README's example table copied into bncheck.toml as it is, [tool.bncheck] header included
    (tmp_path / "bncheck.toml").write_text(
        '[tool.bncheck]\nfail-on = "warning"\n[tool.bncheck.per-model."stale_*.onnx"]\ndata = "calib_drift.npz"\n'
    )
    result = CliRunner().invoke(main, [*fixed[:3], "e2.onnx"])
    assert result.exit_code == 1 and "--fail-on warning (exit 1)" in result.stdout
    assert CliRunner().invoke(main, [*fixed[:3], "e3.onnx", "--fail-on", "error"]).exit_code == 0  # the CLI wins
    document = json.loads(CliRunner().invoke(main, [*drift[:3], "s2.onnx", "--format", "json"]).stdout)
    assert document["fix"]["changed"] is True and document["exit_code"] == 0  # recalibrated from the data
