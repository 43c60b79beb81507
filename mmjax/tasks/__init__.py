"""Registry of tasks: `config.task` -> Task subclass."""

from mmjax.tasks.base import Task
from mmjax.tasks.clip import ClipTask
from mmjax.tasks.flamingo import FlamingoTask
from mmjax.tasks.llava import LlavaTask
from mmjax.tasks.vq import VQTask

TASKS = {'clip': ClipTask, 'flamingo': FlamingoTask, 'llava': LlavaTask, 'vq': VQTask}


def get_task(config) -> Task:
  if config.task not in TASKS:
    raise ValueError(f'config.task={config.task!r} is unknown; known: {sorted(TASKS)}')
  return TASKS[config.task](config)
