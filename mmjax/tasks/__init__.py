"""Registry of tasks: `config.task` -> Task subclass."""

from mmjax import config_lib
from mmjax.tasks.base import Task
from mmjax.tasks.chameleon import ChameleonTask
from mmjax.tasks.clip import ClipTask
from mmjax.tasks.flamingo import FlamingoTask
from mmjax.tasks.llava import LlavaTask
from mmjax.tasks.vq import VQTask

TASKS = {'chameleon': ChameleonTask, 'clip': ClipTask, 'flamingo': FlamingoTask,
         'llava': LlavaTask, 'vq': VQTask}


def task_class(config) -> type[Task]:
  if config.task not in TASKS:
    raise ValueError(f'config.task={config.task!r} is unknown; known: {sorted(TASKS)}')
  return TASKS[config.task]


def get_task(config) -> Task:
  return task_class(config)(config)


def validate_config(config, num_devices: int, *, training: bool = True) -> dict[str, int]:
  """`config_lib.validate` (the keys every config has), then the family's own checks
  (`Task.validate_config`). Returns the resolved mesh shape.

  training: False skips the checks of the training batch against the mesh (`mmjax.evaluate`).
  """
  mesh = config_lib.validate(config, num_devices, training=training)
  task_class(config).validate_config(config)
  return mesh
