"""The layers of mmjax (docs/architecture.md) read from the source: which module imports which.

Every `import` and `from ... import` of an mmjax module, at any depth of a file (function-level
imports too), is an edge. The checks: no cycle; no import from a lower layer to a higher one;
no module reads another module's `_private` name.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'mmjax')

# Module prefix -> the prefixes it may import (itself included). The first matching prefix
# (longest first) decides. Core modules import only core modules.
CORE = ('mmjax.sharding', 'mmjax.distributed', 'mmjax.xla_flags', 'mmjax.checkpoint',
        'mmjax.files', 'mmjax.metrics_writer', 'mmjax.losses', 'mmjax.ring_losses')
ALLOWED = {
    **{module: CORE for module in CORE},
    'mmjax.data': CORE + ('mmjax.data',),
    'mmjax.models': CORE + ('mmjax.models',),
    'mmjax.convert': CORE + ('mmjax.models', 'mmjax.convert'),
    'mmjax.generate': CORE + ('mmjax.generate',),
    'mmjax.mixed_modal': CORE + ('mmjax.mixed_modal',),
    'mmjax.evals': CORE + ('mmjax.data', 'mmjax.evals'),
    'mmjax.config_lib': CORE + ('mmjax.config_lib',),
    'mmjax.tasks': CORE + ('mmjax.data', 'mmjax.models', 'mmjax.convert', 'mmjax.generate',
                           'mmjax.mixed_modal', 'mmjax.evals', 'mmjax.config_lib',
                           'mmjax.tasks'),
    'mmjax.train': ('mmjax',),
    'mmjax.evaluate': ('mmjax',),
    'mmjax.experiment': ('mmjax',),
    'mmjax': ('mmjax',),  # the package's own __init__
}


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the mmjax package."""
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        modules[dotted.removesuffix('.__init__')] = path
  return modules


MODULES = _modules()


def _imports(path: str) -> list[tuple[str, str | None, int]]:
  """(imported mmjax module, name read from it or None, line) for each import in `path`."""
  found = []
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found += [(alias.name, None, node.lineno) for alias in node.names
                if alias.name.split('.')[0] == 'mmjax']
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split('.')[0] != 'mmjax':
        continue
      for alias in node.names:
        submodule = f'{node.module}.{alias.name}'
        if submodule in MODULES:
          found.append((submodule, None, node.lineno))
        else:
          found.append((node.module, alias.name, node.lineno))
  return found


def _graph() -> dict[str, set[str]]:
  return {module: {imported for imported, _, _ in _imports(path)}
          for module, path in MODULES.items()}


def _layer(module: str) -> str:
  return max((prefix for prefix in ALLOWED
              if module == prefix or module.startswith(prefix + '.')), key=len)


def test_modules_are_found():
  assert {'mmjax.train', 'mmjax.tasks.clip', 'mmjax.models.decoder', 'mmjax.evals'} <= set(
      MODULES)


def test_no_import_cycle():
  graph = _graph()
  state, stack = {}, []

  def visit(module):
    state[module] = 'open'
    stack.append(module)
    for imported in sorted(graph.get(module, ())):
      if state.get(imported) == 'open':
        cycle = stack[stack.index(imported):] + [imported]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if imported not in state:
        visit(imported)
    stack.pop()
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module)


def test_no_import_from_a_lower_layer_to_a_higher_one():
  wrong = []
  for module, path in MODULES.items():
    allowed = ALLOWED[_layer(module)]
    for imported, _, line in _imports(path):
      if not any(imported == a or imported.startswith(a + '.') for a in allowed):
        wrong.append(f'{os.path.relpath(path, REPO)}:{line} imports {imported}')
  assert not wrong, '\n'.join(wrong)


def test_no_module_reads_another_modules_private_names():
  wrong = []
  for module, path in MODULES.items():
    tree = ast.parse(open(path).read(), path)
    aliases = {}  # local name -> imported mmjax module
    for imported, name, line in _imports(path):
      if name is not None and name.startswith('_') and not name.startswith('__'):
        wrong.append(f'{os.path.relpath(path, REPO)}:{line} imports {imported}.{name}')
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:
          if f'{node.module}.{alias.name}' in MODULES:
            aliases[alias.asname or alias.name] = f'{node.module}.{alias.name}'
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name in MODULES and alias.asname:
            aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and aliases[node.value.id] != module
          and node.attr.startswith('_') and not node.attr.startswith('__')):
        wrong.append(f'{os.path.relpath(path, REPO)}:{node.lineno} reads '
                     f'{aliases[node.value.id]}.{node.attr}')
  assert not wrong, '\n'.join(wrong)
