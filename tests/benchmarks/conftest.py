"""The input benchmarks' tiny runs share one set of stand-in videos, written once."""

import dataclasses
import json

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("stand_in"))


@pytest.fixture(scope="session")
def run_tiny(cache_dir):
  """run(module, settings) -> (its results as --json writes them, its log lines)."""
  def run(module, settings):
    lines = []
    out = module.run_benchmark(dataclasses.replace(settings, cache_dir=cache_dir), log=lines.append)
    return json.loads(json.dumps(out)), lines
  return run
