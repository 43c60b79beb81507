r"""Runs an experiment file: a grid of config overrides x seeds, one training run each, and
tabulates their final evaluation as mean and spread over seeds.

  python -m mmjax.experiment experiments/siglip_vs_softmax.py --workdir workdirs/siglip_vs_softmax

An experiment file is an ml-collections config file whose `get_config()` returns:

  base:      the config every run starts from, 'configs/FILE.py:VARIANT' (relative to the
             current directory, else to the repository)
  overrides: {key: value} applied to every run (nested dicts name dotted keys:
             dict(data=dict(name='emoji')) is data.name; an empty dict is a value)
  grid:      {key: (value, ...)}: every combination is an arm (nested like overrides)
  arms:      {name: {key: value}}: named arms, crossed with the grid (either may be empty)
  seeds:     (seed, ...): each arm runs once per seed (`config.seed`)
  metrics:   ('evaluator/metric', ...) to tabulate, from each run's final evaluation, or
             'train/nonfinite_steps' (the steps skipped as non-finite)
  lower_is_better: optional subset of `metrics` whose best arm has the lowest mean (losses);
             the others' best has the highest
  plot_x:    optional grid key for the plot's x axis (one line per other arm settings);
             None: bars per arm

Each run trains in `<workdir>/<arm>/seed_<seed>` with `mmjax.train.run` (resuming whatever
is there) and, when finished, writes `result.json` there (atomically). Running the same
command again skips finished runs and resumes a killed one, so a killed grid loses nothing.
Runs go seed by seed (every arm's first seed before any second seed), so a partial grid
already compares the arms. At the end it writes `results.md` (the table), `results.json`
and `results.png` into the workdir, over every finished run (the table names the runs still
missing). On a cluster, one job per arm: `--arm=NAME` (repeatable) runs only the named
arms; each job's table covers what has finished so far, the last one's all of it.
"""

import itertools
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from mmjax import config_lib
from mmjax import distributed
from mmjax import evaluate
from mmjax import files
from mmjax import tasks
from mmjax import train
from mmjax import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('base', 'overrides', 'grid', 'arms', 'seeds', 'metrics', 'lower_is_better', 'plot_x')


def flatten(tree, prefix: str = '', *, leaf=None) -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}. Recurses into non-empty dicts (and ConfigDicts), or
  where `leaf(value)` is False if given."""
  flat = {}
  for key, value in dict(tree).items():
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    is_leaf = leaf(value) if leaf else not (isinstance(value, dict) and value)
    if is_leaf:
      flat[prefix + key] = value
    else:
      flat.update(flatten(value, f'{prefix}{key}.', leaf=leaf))
  return flat


class Run:
  """One training run of the grid: an arm's overrides at one seed, in its own workdir."""

  def __init__(self, arm: str, overrides: dict, seed: int, workdir: str):
    self.arm, self.overrides, self.seed, self.workdir = arm, overrides, seed, workdir

  @property
  def result_path(self) -> str:
    return os.path.join(self.workdir, 'result.json')

  def done(self) -> bool:
    return os.path.exists(self.result_path)

  def result(self) -> dict:
    with open(self.result_path) as f:
      return json.load(f)


def load(path: str) -> ml_collections.ConfigDict:
  """The experiment file at `path`, checked (an unknown or missing key names itself)."""
  experiment = config_lib.load(path)
  unknown = set(experiment.keys()) - set(KEYS)
  if unknown:
    raise KeyError(f'{path}: unknown experiment keys {sorted(unknown)}; known: {KEYS}')
  for key in ('base', 'seeds', 'metrics'):
    if key not in experiment or not experiment[key]:
      raise KeyError(f'{path}: experiment key {key!r} is missing or empty')
  unknown = sorted(set(experiment.get('lower_is_better') or ()) - set(experiment.metrics))
  if unknown:
    raise KeyError(f'{path}: lower_is_better names {unknown}, which are not in its metrics')
  return experiment


def base_path(spec: str) -> str:
  """`configs/clip.py:small` relative to the current directory, else to the repository."""
  path, sep, variant = spec.partition(':')
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  return path + sep + variant


def _value_name(value) -> str:
  return str(value).replace('/', '-').replace(' ', '')


def arms(experiment) -> dict[str, dict]:
  """{arm name: {dotted key: value}}: the named arms crossed with the grid's combinations;
  a name lists its grid settings by their last key part, e.g. 'siglip,batch_size=64'."""
  grid = flatten(experiment.get('grid') or {}, leaf=lambda v: isinstance(v, (tuple, list)))
  named = {name: flatten(overrides) for name, overrides in
           dict(experiment.get('arms') or {}).items()} or {'': {}}
  result = {}
  for name, overrides in named.items():
    for values in itertools.product(*grid.values()):
      setting = dict(zip(grid, values))
      parts = [name] if name else []
      parts += [f'{key.split(".")[-1]}={_value_name(value)}' for key, value in setting.items()]
      result[','.join(parts) or 'base'] = {**overrides, **setting}
  return result


def plan(experiment, workdir: str) -> list[Run]:
  """Every run of the grid, seed by seed."""
  return [Run(arm, overrides, seed, os.path.join(workdir, arm.replace('=', '-'),
                                                 f'seed_{seed}'))
          for seed in experiment.seeds for arm, overrides in arms(experiment).items()]


def run_config(experiment, run: Run) -> ml_collections.ConfigDict:
  """The base config with the experiment's overrides, the run's arm and seed."""
  overrides = {**flatten(experiment.get('overrides') or {}), **run.overrides, 'seed': run.seed}
  return config_lib.load(base_path(experiment.base), overrides)


def train_and_evaluate(config, run: Run) -> dict:
  """Trains `run` (resuming its workdir), evaluates the final step, writes `result.json`:
  the evaluation's metrics and `train/nonfinite_steps`, the steps skipped as non-finite
  (`config.nonfinite='skip'`)."""
  state, metrics = train.run(config, run.workdir)
  if not metrics:  # resumed at the end (a kill after training, before result.json)
    _, metrics, _ = evaluate.run(run.workdir)
  metrics = {key: float(value) for key, value in metrics.items() if np.ndim(value) == 0}
  metrics['train/nonfinite_steps'] = float(jax.device_get(state['nonfinite_steps']))
  result = {'arm': run.arm, 'seed': run.seed, 'overrides': run.overrides, 'metrics': metrics}
  if distributed.is_chief():
    with files.atomic_write(run.result_path) as f:
      json.dump(result, f, indent=1)
  return result


def summarize(experiment, results: list[dict]) -> dict:
  """{metric: {arm: {'values', 'mean', 'std', 'min', 'max'}}} over the runs' seeds, arms in
  grid order; a metric a run lacks raises KeyError naming it and what the run has."""
  summary = {}
  order = list(arms(experiment))
  for metric in experiment.metrics:
    per_arm = {}
    for result in sorted(results, key=lambda r: (order.index(r['arm']), r['seed'])):
      if metric not in result['metrics']:
        raise KeyError(f'metric {metric!r} is not in the results of {result["arm"]} seed '
                       f'{result["seed"]}; it has {sorted(result["metrics"])}')
      per_arm.setdefault(result['arm'], []).append(result['metrics'][metric])
    summary[metric] = {arm: dict(values=values, mean=float(np.mean(values)),
                                 std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                                 min=float(np.min(values)), max=float(np.max(values)))
                       for arm, values in per_arm.items()}
  return summary


def table(summary: dict, *, title: str, lower_is_better=()) -> str:
  """Markdown: one row per arm, `mean ± std (n)` per metric; then, per metric, the best arm
  (the highest mean; the lowest for the metrics in `lower_is_better`) and which arms differ
  from it by more than the seed spread (their ranges over seeds do not overlap the best
  arm's)."""
  metrics = list(summary)
  arm_names = list(next(iter(summary.values()), {}))
  if not arm_names:
    return f'## {title}\n\nNo run has finished yet.\n'
  lines = [f'## {title}', '', '| arm | ' + ' | '.join(metrics) + ' |',
           '| --- |' + ' --- |' * len(metrics)]
  for arm in arm_names:
    cells = [f"{s['mean']:.4f} ± {s['std']:.4f} ({len(s['values'])})"
             for s in (summary[metric][arm] for metric in metrics)]
    lines.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'mean ± sample standard deviation (number of seeds). Beyond the seed spread: '
            "the arm's range over seeds does not overlap the best arm's.", '']
  for metric in metrics:
    stats = summary[metric]
    lower = metric in lower_is_better
    sign = -1 if lower else 1
    best = max(stats, key=lambda arm: sign * stats[arm]['mean'])
    if len(stats[best]['values']) < 2:
      lines.append(f"- `{metric}`: best {best} ({stats[best]['mean']:.4f}); one seed: no "
                   'spread to compare the arms with.')
      continue
    single = [arm for arm in stats if arm != best and len(stats[arm]['values']) < 2]
    apart = [arm for arm in stats if arm != best and arm not in single and (
        stats[arm]['min'] > stats[best]['max'] if lower
        else stats[arm]['max'] < stats[best]['min'])]
    within = [arm for arm in stats if arm != best and arm not in single + apart]
    worse = 'above' if lower else 'below'
    lines.append(f"- `{metric}`: best {best} ({stats[best]['mean']:.4f}); {worse} it beyond the "
                 f"seed spread: {', '.join(apart) or 'none'}; within it: "
                 f"{', '.join(within) or 'none'}"
                 + (f"; one seed only: {', '.join(single)}." if single else '.'))
  return '\n'.join(lines) + '\n'


def plot(summary: dict, results: list[dict], path: str, plot_x: str | None = None) -> str:
  """One panel per metric: each seed's value as a dot and the mean (bars per arm, or lines
  over `plot_x` with one line per setting of the other keys)."""
  figure = Figure(figsize=(5.5 * len(summary), 4.2))
  axes = np.atleast_1d(figure.subplots(1, len(summary)))
  for axis, (metric, stats) in zip(axes, summary.items()):
    if plot_x is None:
      names = list(stats)
      axis.bar(range(len(names)), [stats[a]['mean'] for a in names], color='#9ecae1')
      for i, arm in enumerate(names):
        axis.plot([i] * len(stats[arm]['values']), stats[arm]['values'], 'k.')
      axis.set_xticks(range(len(names)), names, rotation=30, ha='right', fontsize=7)
    else:
      lines = {}
      for result in results:
        x = result['overrides'][plot_x]
        rest = ','.join(part for part in result['arm'].split(',')
                        if not part.startswith(plot_x.split('.')[-1] + '='))
        lines.setdefault(rest or metric, {}).setdefault(x, []).append(result['metrics'][metric])
      for label, points in sorted(lines.items()):
        xs = sorted(points)
        axis.plot(xs, [np.mean(points[x]) for x in xs], marker='o', label=label)
        for x in xs:
          axis.plot([x] * len(points[x]), points[x], 'k.', markersize=3)
      axis.set_xscale('log', base=2)
      axis.set_xlabel(plot_x)
      axis.legend(fontsize=7)
    axis.set_title(metric, fontsize=9)
    axis.grid(alpha=0.3)
  figure.tight_layout()
  with files.atomic_write(path, 'wb') as f:
    figure.savefig(f, dpi=100, format='png')
  return path


def run(path: str, workdir: str, only_arms: list[str] | None = None) -> dict:
  """Runs (or resumes) experiment file `path` in `workdir` (only the arms `only_arms`, if
  given); returns the summary of every finished run of the grid."""
  experiment = load(path)
  runs = plan(experiment, workdir)
  unknown = set(only_arms or ()) - {r.arm for r in runs}
  if unknown:
    raise ValueError(f'--arm: {sorted(unknown)} not in {path}; its arms: '
                     f'{list(arms(experiment))}')
  mine = [r for r in runs if not only_arms or r.arm in only_arms]
  configs = [run_config(experiment, r) for r in mine]
  for config in configs:  # every arm's config error before the first run trains
    tasks.validate_config(config, len(jax.devices()))
  os.makedirs(workdir, exist_ok=True)
  for index, (r, config) in enumerate(zip(mine, configs), 1):
    head = f'[{index}/{len(mine)}] {r.arm} seed {r.seed}'
    if r.done():
      print(f'{head}: done', flush=True)
      continue
    print(f'{head}: training in {r.workdir}', flush=True)
    metrics = train_and_evaluate(config, r)['metrics']
    absent = [m for m in experiment.metrics if m not in metrics]
    if absent:  # fail at the first run, not after the whole grid
      raise KeyError(f'{path}: metrics {absent} are not in the evaluation of {r.arm} seed '
                     f'{r.seed}; it has {sorted(metrics)}')
    print(f'{head}: ' + '  '.join(f'{m} {metrics[m]:.4f}' for m in experiment.metrics
                                  if m in metrics), flush=True)
  finished = [r for r in runs if r.done()]
  missing = [f'{r.arm} seed {r.seed}' for r in runs if not r.done()]
  results = [r.result() for r in finished]
  summary = summarize(experiment, results)
  if not distributed.is_chief():
    return summary
  name = os.path.basename(path).removesuffix('.py')
  lower_is_better = tuple(experiment.get('lower_is_better') or ())
  text = table(summary, title=f'{name} ({experiment.base})', lower_is_better=lower_is_better)
  if missing:
    text += f'\nNot finished yet ({len(missing)} of {len(runs)} runs): ' + ', '.join(missing) + '\n'
  with files.atomic_write(os.path.join(workdir, 'results.md')) as f:
    f.write(text)
  with files.atomic_write(os.path.join(workdir, 'results.json')) as f:
    json.dump({'experiment': experiment.to_dict(), 'runs': results, 'summary': summary}, f,
              indent=1, default=str)
  if results:
    plot(summary, results, os.path.join(workdir, 'results.png'), experiment.get('plot_x'))
  print(open(os.path.join(workdir, 'results.md')).read(), flush=True)
  return summary


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m mmjax.experiment EXPERIMENT.py --workdir DIR')
  xla_flags.apply()
  logging.set_verbosity(logging.WARNING)
  distributed.initialize(*(holder.value for holder in _DISTRIBUTED))
  run(argv[1], _WORKDIR.value, _ARMS.value)


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the grid\'s runs and tables.')
  _ARMS = flags.DEFINE_multi_string('arm', None, 'Run only this arm (its name as in '
                                    'results.md; repeatable), e.g. one job per arm on a cluster.')
  _DISTRIBUTED = distributed.define_flags()
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
