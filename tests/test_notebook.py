"""The evaluation notebook runs top to bottom, headless, as a user would run it."""

import os

import nbclient
import nbformat
import pytest

# Trains (tiny_clip_run) and compares with transformers.
pytestmark = [pytest.mark.slow, pytest.mark.parity]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'experiments', 'notebooks', 'evaluate_clip.ipynb')


def test_evaluate_clip_notebook_runs(tmp_path, monkeypatch, tiny_clip_run, xla_flags):
  # On a finished run, as a user evaluates theirs (without MMJAX_WORKDIR the notebook first
  # trains this same tiny config with `train.run`).
  monkeypatch.setenv('MMJAX_DATA_DIR', tiny_clip_run.data_dir)
  monkeypatch.setenv('MMJAX_WORKDIR', tiny_clip_run.workdir)
  monkeypatch.setenv('XLA_FLAGS', xla_flags(1))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # Raises CellExecutionError naming the failing cell.
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 2  # the zero-shot grid and the training curves
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'max |ours - transformers| =' in text
  difference = float(text.split('max |ours - transformers| =')[1].split()[0])
  assert difference < 1e-5
