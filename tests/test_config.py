"""fastvit_reduce.config, the strict config layer: unknown keys, 0/1 flags, ranges, base files, precedence."""
import pytest
from fastargs import Param, Section, get_current_config

from fastvit_reduce.config import (Bool01, Choice, ConfigError, FloatList, Number, load_config,
                                   resolved)

Section("cfgtest", "test-only section").params(
    flag=Param(Bool01(), "a 0/1 flag", default=0),
    mode=Param(Choice("a", "b"), "a choice", default="a"),
    ratio=Param(Number(float, 0, 1, lo_open=True), "in (0, 1]", default=0.5),
    count=Param(Number(int, 1), "an int >= 1", default=2),
    betas=Param(FloatList(2), "two floats", default=[0.9, 0.999]),
    name=Param(str, "a string", default=""),
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_values_from_yaml_and_cli(tmp_path):
    f = write(tmp_path, "a.yaml", "cfgtest:\n  flag: 1\n  mode: b\n  ratio: 0.25\n")
    load_config(["--config", f, "--cfgtest.count=7", "--cfgtest.betas=0.8,0.95"], ["cfgtest"])
    cfg = get_current_config()
    assert cfg["cfgtest.flag"] is True
    assert cfg["cfgtest.mode"] == "b"
    assert cfg["cfgtest.ratio"] == 0.25
    assert cfg["cfgtest.count"] == 7
    assert cfg["cfgtest.betas"] == [0.8, 0.95]
    assert resolved(["cfgtest"])["cfgtest.name"] == ""


def test_precedence_cli_over_later_file_over_earlier_file(tmp_path):
    a = write(tmp_path, "a.yaml", "cfgtest:\n  count: 3\n  mode: b\n")
    b = write(tmp_path, "b.yaml", "cfgtest:\n  count: 4\n")
    load_config(["--config", a, "--config", b], ["cfgtest"])
    assert get_current_config()["cfgtest.count"] == 4
    assert get_current_config()["cfgtest.mode"] == "b"
    load_config(["--config", a, "--config", b, "--cfgtest.count", "5"], ["cfgtest"])
    assert get_current_config()["cfgtest.count"] == 5


def test_base_key_chains_files(tmp_path):
    write(tmp_path, "base.yaml", "cfgtest:\n  count: 3\n  mode: b\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ncfgtest:\n  count: 9\n")
    load_config(["--config", child], ["cfgtest"])
    assert (get_current_config()["cfgtest.count"], get_current_config()["cfgtest.mode"]) == (9, "b")
    loop = write(tmp_path, "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(["--config", loop], ["cfgtest"])


def test_no_leak_between_loads(tmp_path):
    load_config(["--cfgtest.count=8"], ["cfgtest"])
    load_config([], ["cfgtest"])
    assert get_current_config()["cfgtest.count"] == 2


@pytest.mark.parametrize("argv, key", [
    (["--cfgtest.flg=1"], "cfgtest.flg"),                 # typo on the CLI
    (["--other.x=1"], "other.x"),                          # section not allowed here
])
def test_unknown_cli_keys_are_named(argv, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(argv, ["cfgtest"])


def test_unknown_yaml_key_is_named_with_suggestion(tmp_path):
    f = write(tmp_path, "typo.yaml", "cfgtest:\n  ration: 0.3\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", f], ["cfgtest"])
    assert "cfgtest.ration" in str(e.value) and "did you mean 'cfgtest.ratio'" in str(e.value)
    assert "typo.yaml" in str(e.value)


@pytest.mark.parametrize("argv", [
    ["--cfgtest.flag=False"], ["--cfgtest.flag=true"], ["--cfgtest.flag=2"],
    ["--cfgtest.mode=c"], ["--cfgtest.ratio=0"], ["--cfgtest.ratio=1.5"],
    ["--cfgtest.count=0"], ["--cfgtest.count=2.5"], ["--cfgtest.betas=0.9"],
])
def test_bad_values_are_rejected_naming_key(argv):
    key = argv[0][2:].split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(argv, ["cfgtest"])


def test_yaml_true_is_not_a_flag(tmp_path):
    f = write(tmp_path, "b.yaml", "cfgtest:\n  flag: true\n")
    with pytest.raises(ConfigError, match="0 or 1"):
        load_config(["--config", f], ["cfgtest"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config", str(tmp_path / "missing.yaml")], ["cfgtest"])
    bad = write(tmp_path, "bad.yaml", "cfgtest: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(["--config", bad], ["cfgtest"])
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(["positional"], ["cfgtest"])


@pytest.mark.parametrize("text, line", [
    ("cfgtest:\n  count: 3\n  mode: b\n  count: 4\n", 4),          # a key repeated
    ("cfgtest:\n  count: 3\nother: {}\ncfgtest:\n  mode: b\n", 4),  # a whole section repeated
])
def test_a_repeated_key_or_section_is_an_error_naming_the_line(tmp_path, text, line):
    f = write(tmp_path, "dup.yaml", text)
    with pytest.raises(ConfigError, match=rf"dup.yaml: line {line}: key '\w+' repeated") as e:
        load_config(["--config", f], ["cfgtest"])
    assert "\n" not in str(e.value)


def test_a_key_given_dotted_and_nested_is_an_error(tmp_path):
    f = write(tmp_path, "dup.yaml", "cfgtest.count: 3\ncfgtest:\n  count: 4\n")
    with pytest.raises(ConfigError, match="'cfgtest.count' is given twice"):
        load_config(["--config", f], ["cfgtest"])


@pytest.mark.parametrize("base", ["5", "[a.yaml, 7]", "{x: 1}", "''"])
def test_base_that_is_not_a_file_name_is_a_config_error(tmp_path, base):
    f = write(tmp_path, "c.yaml", f"base: {base}\n")
    with pytest.raises(ConfigError, match="'base' must be a file name or a list of file names"):
        load_config(["--config", f], ["cfgtest"])


@pytest.mark.parametrize("key, value", [("ratio", "nan"), ("ratio", "inf"), ("count", "nan"),
                                        ("count", "-inf"), ("betas", "0.9,nan")])
def test_nan_and_inf_fail_number_checks_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"'cfgtest.{key}'.*not a finite number"):
        load_config([f"--cfgtest.{key}={value}"], ["cfgtest"])


def test_nan_from_yaml_fails_too(tmp_path):
    f = write(tmp_path, "n.yaml", "cfgtest:\n  ratio: .nan\n")
    with pytest.raises(ConfigError, match="'cfgtest.ratio'"):
        load_config(["--config", f], ["cfgtest"])
