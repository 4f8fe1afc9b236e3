"""Config files: `--config PATH|NAME` plus `--config.a.b=value` overrides, as absl's config_flags.

A config is a Python file whose `get_config()` returns an `ml_collections.ConfigDict`; NAME
(e.g. `tiny`) means the file `configs/NAME.py` of the installed package.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os

import ml_collections


class ConfigError(ValueError):
  pass


def load_config(
  path_or_name: str, overrides: list[str] | tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
  if path_or_name.endswith(".py") or os.sep in path_or_name:
    if not os.path.exists(path_or_name):
      raise ConfigError(f"{path_or_name}: config file not found")
    spec = importlib.util.spec_from_file_location(
      f"_rrtf_config_{abs(hash(path_or_name))}", path_or_name
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(f"configs.{path_or_name}")
    except ModuleNotFoundError:
      raise ConfigError(
        f"unknown config {path_or_name!r}: not a file and not configs/{path_or_name}.py"
      ) from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path_or_name}: has no get_config()")
  config = module.get_config()
  for item in overrides:
    apply_override(config, item)
  return config


def _parse(value: str, old):
  if isinstance(old, bool):
    if value.lower() in ("true", "1", "yes"):
      return True
    if value.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"{value!r} is not a boolean")
  if isinstance(old, (int, float)) and not isinstance(old, bool):
    return type(old)(value)
  if isinstance(old, str):
    return value
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies 'a.b=value' (a leading '--config.' is accepted) with the field's type."""
  key, eq, value = item.removeprefix("--").removeprefix("config.").partition("=")
  if not eq:
    raise ConfigError(f"bad override {item!r}: expected --config.FIELD=VALUE")
  *groups, name = key.split(".")
  node = config
  for group in groups:  # only through groups: `in` on a str field would test for a substring
    node = node.get(group)
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"bad override {item!r}: no field {key!r} in the config")
  if name not in node:
    raise ConfigError(f"bad override {item!r}: no field {key!r} in the config")
  try:
    node[name] = _parse(value, node[name])
  except (ValueError, TypeError) as e:
    raise ConfigError(f"bad override {item!r}: {e}") from None


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.x=y` items (and `--config.x y`) from the other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      if "=" not in a and i + 1 < len(argv):
        a = f"{a}={argv[i + 1]}"
        i += 1
      overrides.append(a)
    else:
      rest.append(a)
    i += 1
  return rest, overrides
