"""configurator.configure: config files and --key=value overrides, applied in order, checked against the defaults."""
import os

import pytest

from configurator import ConfigError, configure
from conftest import ROOT

DEFAULTS = {"out_dir": "out", "batch_size": 8, "lr": 1e-4, "compile": True, "n_kv_head": None, "device": "auto"}


def message(excinfo):
    return str(excinfo.value.code)


def test_files_then_overrides_in_order(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("import math\n_helper = 3\nbatch_size = 2 * _helper\nlr = math.sqrt(4) * 1e-4\n")
    b = tmp_path / "b.py"
    b.write_text("batch_size = 16\n")
    cfg = configure(DEFAULTS, [str(a), "--batch_size=4", str(b), "--out_dir=out/run 1", "--n_kv_head=2"])
    assert cfg == {**DEFAULTS, "batch_size": 16, "lr": 2e-4, "out_dir": "out/run 1", "n_kv_head": 2}
    assert DEFAULTS["batch_size"] == 8  # the defaults are not modified


def test_types_int_for_float_bool_and_none():
    cfg = configure(DEFAULTS, ["--lr=1", "--compile=False", "--n_kv_head='x'"])
    assert cfg["lr"] == 1.0 and type(cfg["lr"]) is float and cfg["compile"] is False and cfg["n_kv_head"] == "x"


@pytest.mark.parametrize("arg, expect", [
    ("--batch_size=2.5", "batch_size in override '--batch_size=2.5' must be int like its default 8, got float 2.5"),
    ("--compile=1", "compile in override '--compile=1' must be bool like its default True, got int 1"),
    ("--batch_size=True", "must be int"),
    ("--lr=fast", "lr in override '--lr=fast' must be float like its default 0.0001, got str 'fast'"),
    ("--batchsize=4", "unknown key 'batchsize' in override '--batchsize=4'; did you mean batch_size?"),
    ("--zzz=1", "unknown key 'zzz'"),
    ("--compile", "override '--compile' has no value; write it as --key=value"),
    ("--device=tpu", "device='tpu' in override '--device=tpu' is not one of 'auto', 'cuda', 'cpu'"),
    ("nonexistent.py", "config file 'nonexistent.py' does not exist"),
])
def test_errors_name_the_key(arg, expect):
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, [arg], choices={"device": ("auto", "cuda", "cpu")})
    assert expect in message(e)
    assert e.value.code.startswith("config error: ")  # a SystemExit: the user sees this line and exit status 1


def test_errors_in_config_files(tmp_path):
    bad_key = tmp_path / "bad_key.py"
    bad_key.write_text("batch_sise = 4\n")
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, [str(bad_key)])
    assert f"unknown key 'batch_sise' in config file {bad_key}; did you mean batch_size?" in message(e)
    bad_type = tmp_path / "bad_type.py"
    bad_type.write_text("compile = 'yes'\n")
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, [str(bad_type)])
    assert f"compile in config file {bad_type} must be bool" in message(e)
    broken = tmp_path / "broken.py"
    broken.write_text("batch_size = 1 / 0\n")
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, [str(broken)])
    assert f"config file {broken} failed to run: ZeroDivisionError" in message(e)


def test_readme_lists_exactly_the_keys_of_settings_py_with_their_defaults():
    """README's "Every key" table and settings.DEFAULTS (which train.py, tools/bench.py and the tests read) name the
    same keys, with the same defaults."""
    import ast

    import settings
    defaults, choices = settings.DEFAULTS, settings.CHOICES
    assert {"out_dir", "lr", "eval_tasks", "seed"} <= set(defaults) and "optimizer" in choices
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme.split("Every key (settings.py):", 1)[1].split("\n\n", 2)[1]
    listed = {}
    for row in table.splitlines()[2:]:
        key, default = (cell.strip().strip("`") for cell in row.split(" | ")[:2])
        listed[key.lstrip("| `")] = ast.literal_eval(default)
    assert sorted(listed) == sorted(defaults)
    for key, value in defaults.items():
        assert listed[key] == value and type(listed[key]) is type(value), (key, listed[key], value)
