"""The `rrtf` console script, config files and overrides (the demo: test_demo.py)."""

import os
import shutil
import subprocess

import pytest

from rrtf_jax.config_loading import ConfigError, load_config, split_overrides


def test_console_script_help_lists_subcommands():
  exe = shutil.which("rrtf")
  assert exe, "pip install -e . must put `rrtf` on PATH"
  out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
  for cmd in ("convert", "export", "plan", "demo"):
    assert f"    {cmd} " in out, out


@pytest.mark.parametrize("name", ["tiny", "starcoder_1b", "starcoder_15b"])
def test_configs_load_by_name_and_path(name):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  a, b = load_config(name), load_config(os.path.join(root, "configs", f"{name}.py"))
  assert a.to_dict() == b.to_dict()


def test_overrides_are_typed():
  c = load_config(
    "tiny",
    [
      "--config.model.num_layers=3",
      "--config.model.scale_attn_weights=false",
      "--config.model.dtype=bfloat16",
      "--config.mesh=fsdp=2,tensor=2",
    ],
  )
  assert c.model.num_layers == 3 and c.model.scale_attn_weights is False
  assert c.model.dtype == "bfloat16" and c.mesh == "fsdp=2,tensor=2"
  with pytest.raises(ConfigError, match="no field 'model.nope'"):
    load_config("tiny", ["--config.model.nope=1"])
  with pytest.raises(ConfigError, match="invalid literal"):
    load_config("tiny", ["--config.model.num_layers=two"])
  with pytest.raises(ConfigError, match="unknown config 'huge'"):
    load_config("huge")


def test_split_overrides():
  rest, over = split_overrides(
    ["plan", "--config", "tiny", "--config.model.num_layers", "3", "--config.seed=1"]
  )
  assert rest == ["plan", "--config", "tiny"] and over == [
    "--config.model.num_layers=3",
    "--config.seed=1",
  ]


def test_bugs_keep_their_traceback_and_bad_overrides_are_one_line(monkeypatch, capsys):
  """Only bad input is a one-line `rrtf X: error:` with exit 2: a KeyError from a bug in a
  handler propagates (the console script prints its traceback), while a bad override key, even
  one that runs through a value (model.num_layers is an int), is still one line."""
  from rrtf_jax import cli

  def check_samples_with_a_bug(*args, **kwargs):
    return {}["samples"]

  monkeypatch.setattr("rrtf_jax.stages.check.check_samples", check_samples_with_a_bug)
  with pytest.raises(KeyError, match="samples"):
    cli.main(["check", "--problems", "p.jsonl", "--samples", "s.jsonl", "--out", "out.jsonl"])
  assert "error:" not in capsys.readouterr().err
  for override in ("--config.model.nope=1", "--config.model.num_layers.x=1"):
    assert cli.main(["plan", "--config", "tiny", "--topology", "v5e:2x2", override]) == 2
    err = capsys.readouterr().err
    assert err == (
      f"rrtf plan: error: bad override {override!r}: no field "
      f"{override.removeprefix('--config.').partition('=')[0]!r} in the config\n"
    )


def test_params_on_a_config_without_a_model_section_is_one_line(tmp_path, capsys):
  from rrtf_jax.cli import main

  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  assert main(["params", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 2
  assert "config.json: not an `rrtf train` config (no model section)" in capsys.readouterr().err
  assert not (tmp_path / "m").exists()
