"""Paths: every path the project takes may be local or a URL (gs://, through fsspec)."""

import os


def is_url(path) -> bool:
  """A URL (gs://bucket/x, file://...) rather than a local path."""
  return "://" in str(path)


def join(base, name: str) -> str:
  """`name` under the folder `base`, local or a URL (a trailing slash of `base` is dropped)."""
  return f"{str(base).rstrip('/')}/{name}"


def abspath(path) -> str:
  """A local path made absolute; a URL as is, without a trailing slash."""
  path = str(path)
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)
