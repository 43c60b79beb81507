r"""Zero-shot top-1 of a run per Unicode emoji group and for flags, from the report its
zero-shot evaluator wrote (`<workdir>/eval/zeroshot_report_<step>.json`): which kinds of names
a small CLIP transfers to the held-out drawing style (docs/clip.md).

  python experiments/zeroshot_by_group.py workdirs/clip_small/eval/zeroshot_report_500.json
"""

import collections
import json
import sys

from mmjax.data import emoji


def by_group(per_class_top1: dict[str, float]) -> dict[str, tuple[int, float]]:
  """{group: (names, mean top-1)}, flags ('flag: ...') apart from the rest of their group."""
  groups = emoji.name_groups()
  hits = collections.defaultdict(list)
  for name, top1 in per_class_top1.items():
    hits['flags' if name.startswith('flag:') else groups.get(name, '?')].append(top1)
  return {group: (len(values), sum(values) / len(values))
          for group, values in sorted(hits.items(), key=lambda kv: -len(kv[1]))}


def main(argv):
  if len(argv) != 2:
    raise SystemExit(__doc__)
  with open(argv[1]) as f:
    report = json.load(f)
  for split, stats in report.items():
    print(f'{split}:')
    for group, (count, top1) in by_group(stats['per_class_top1']).items():
      print(f'  {group:24s} {count:5d} names  top-1 {top1:.3f}')


if __name__ == '__main__':
  main(sys.argv)
