"""Every command line refuses bad input in one line (atss_jax/cli.py): a misspelt config field with its "did you
mean", a config file that does not load, a missing or malformed flag, and the refusals the commands raise; the
traceback only with --verbose."""

import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from atss_jax import cli
from tests.support import hangs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_error(argv, monkeypatch):
    """The exception absl and ml_collections raise for `argv` on a fresh set of flags with a config flag."""
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections finds the overrides in sys.argv
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values)
    try:
        flag_values(argv)
    except Exception as error:  # whatever the libraries raise is what cli reads
        return error, flag_values
    return None, flag_values


def test_a_misspelt_field_names_the_override_and_the_field_it_meant(monkeypatch):
    argv = ["prog", "--config=configs/demo.py:tiny", "--config.assigner.topkk=7"]
    error, _ = _parse_error(argv, monkeypatch)
    assert cli.unknown_config_field(error, argv) == (
        "--config.assigner.topkk: the config has no field 'topkk'. Did you mean \"topk\" instead of \"topkk\"?")
    # An error about something else is not taken for a misspelt field.
    assert cli.unknown_config_field(AttributeError("no attribute 'x'"), argv) is None
    assert cli.unknown_config_field(KeyError("topkk"), ["prog", "--config.train.num_steps=2"]) is None


def test_a_config_file_that_does_not_load_is_found_before_any_work(tmp_path, monkeypatch):
    error, flag_values = _parse_error(["prog", f"--config={tmp_path / 'missing.py'}"], monkeypatch)
    assert error is None  # ml_collections defers the error to the config's first use
    message = cli.unloadable_config(flag_values)
    assert message.startswith("--config: the config file does not load: [Errno 2] No such file or directory")
    _, loaded = _parse_error(["prog", "--config=configs/demo.py:tiny"], monkeypatch)
    assert cli.unloadable_config(loaded) is None


def _command(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=hangs.SUBPROCESS_S)


@pytest.mark.e2e
@pytest.mark.parametrize("args, exit_code, line", [
    (["atss_jax.main", "--config=configs/demo.py:tiny", "--workdir=unused", "--config.assigner.topkk=7"], 2,
     "atss_jax.main: --config.assigner.topkk: the config has no field 'topkk'. Did you mean \"topk\" instead of "
     "\"topkk\"?"),
    (["atss_jax.main", "--config=configs/demo.py:tiny", "--workdir=unused", "--config.train.num_steps=ten"], 2,
     "atss_jax.main: flag --config.train.num_steps=ten: invalid literal for int() with base 10: 'ten'"),
    (["scripts.prepare_data", "--config=configs/no_such_config.py"], 2,
     "prepare_data: --config: the config file does not load: [Errno 2] No such file or directory: "
     "'configs/no_such_config.py'"),
    (["scripts.prepare_data", "--config=configs/base.py", "--config.data.name=coco_format"], 1,
     "prepare_data: A coco_format dataset needs a name (config.data.coco_format.name)."),
    (["scripts.export", "--workdir=no_such_workdir", "--export_dir=unused"], 1,
     "export: no_such_workdir/config.json is missing: no_such_workdir is not a training workdir of this version"),
    (["scripts.import_checkpoint", "only_one_argument.pth", "--format=mmdet"], 2, "import_checkpoint: usage: python -m "
     "scripts.import_checkpoint SRC.pth WORKDIR"),
    (["scripts.sweep", "--config=configs/demo.py", "--root=unused", "--values="], 1,
     "sweep: --values is empty: give the values to sweep, comma-separated."),
])
def test_a_refusal_is_one_line_without_traceback_or_flag_listing(args, exit_code, line):
    result = _command(*args)
    assert result.returncode == exit_code, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "--helpfull" not in result.stderr


@pytest.mark.e2e
def test_verbose_adds_the_traceback_after_the_line():
    result = _command("scripts.prepare_data", "--config=configs/base.py", "--config.data.name=coco_format",
                      "--verbose")
    assert result.returncode == 1
    line = "prepare_data: A coco_format dataset needs a name (config.data.coco_format.name)."
    assert line in result.stderr and result.stderr.index(line) < result.stderr.index("Traceback")
    assert "ConfigError" in result.stderr
