"""The suite runs on the tested stack: every package that constraints.txt pins is installed at
that version (`.ci/setup` installs with it). Off the pins (`MMJAX_CONSTRAINTS=none`, see
docs/testing.md) this test fails by design and lists what differs."""

import importlib.metadata
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _normalize(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def test_installed_versions_are_the_pinned_ones():
  with open(os.path.join(REPO, 'constraints.txt')) as f:
    lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  assert lines and all(re.fullmatch(r'[A-Za-z0-9_.-]+==[A-Za-z0-9_.]+', l) for l in lines), lines
  pins = {_normalize(name): version for name, version in (l.split('==') for l in lines)}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'torch',
                  'transformers'):
    assert package in pins, f'constraints.txt does not pin {package}'
  differ = []
  for name, version in pins.items():
    try:
      installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue  # pinned in case it is installed
    if installed.split('+')[0] != version:  # a local label (torch's +cpu) is the index's
      differ.append(f'{name} {installed} (pinned {version})')
  assert not differ, 'installed off the pins: ' + ', '.join(differ)
