"""Registry of tasks: `config.task` -> Task subclass."""

from mmjax.tasks.base import Task
from mmjax.tasks.clip import ClipTask
from mmjax.tasks.vq import VQTask

TASKS = {'clip': ClipTask, 'vq': VQTask}


def get_task(config) -> Task:
  if config.task not in TASKS:
    raise ValueError(f'config.task={config.task!r} is unknown; known: {sorted(TASKS)}')
  return TASKS[config.task](config)
