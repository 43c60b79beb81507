"""Experiment configs, one module per family (`--config configs/<family>.py:VARIANT`).

Each module's `get_config(arg)` returns a locked `ml_collections.ConfigDict`; `common` holds
the training block they share. Installed with mmjax (`pip install -e .`), so the modules
import each other as `from configs import common` from any working directory, also when
`mmjax.config_lib` or `--config` loads a file by its path.
"""
