"""Files that survive a kill at any byte: whole-file writes that replace atomically, and
append-only JSON-lines logs whose torn last line is dropped on reading.

A training process can be killed (SIGKILL, a preempted machine) in the middle of any write.
A file rewritten in place can then be left empty or half old, half new; here a whole file is
written beside its target and renamed over it (`os.replace` is atomic on POSIX), so a reader
sees the old file or the new one. An appended line can be torn; `read_jsonl` keeps only the
lines that end in a newline, and a line that ends in one but does not parse is damage, not a
kill, and raises naming the file and line.
"""

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w'):
  """`with atomic_write(path) as f: ...` writes `path` whole or not at all.

  Writes `<path>.tmp-<pid>`, syncs it to disk and renames it over `path`; on an exception
  the temporary file is removed and `path` is untouched.
  """
  temporary = f'{path}.tmp-{os.getpid()}'
  try:
    with open(temporary, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def append_jsonl(path: str, record: dict) -> None:
  """Appends `record` as one line; a kill mid-write leaves at most a torn last line, which
  the next append cuts off first (so it never merges with a new record)."""
  with open(path, 'ab') as f:
    _cut_torn_line(f)
    f.write((json.dumps(record) + '\n').encode())


def _cut_torn_line(f, chunk: int = 1 << 16) -> None:
  """Truncates the binary file `f` after its last newline (to empty if it has none)."""
  end = f.seek(0, os.SEEK_END)
  position = end
  with open(f.name, 'rb') as reader:
    reader.seek(max(0, end - 1))
    if end == 0 or reader.read(1) == b'\n':
      return
    while position > 0:
      start = max(0, position - chunk)
      reader.seek(start)
      block = reader.read(position - start)
      newline = block.rfind(b'\n')
      if newline >= 0:
        position = start + newline + 1
        break
      position = start
  if position != end:
    f.truncate(position)


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file; [] if it does not exist.

  A last line without its newline (torn by a kill while appending) is dropped. A complete
  line that is not JSON raises ValueError naming the file and the line number.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  lines = text.split('\n')[:-1]  # the piece after the last newline is empty or torn
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as error:
      raise ValueError(f'{path}, line {number}: not a JSON record ({error}); the file is '
                       'damaged (a kill can only tear the last line)') from error
  return records


def rewrite_jsonl(path: str, records: list[dict]) -> None:
  """Replaces the file with `records`, atomically (see `atomic_write`)."""
  with atomic_write(path) as f:
    f.writelines(json.dumps(record) + '\n' for record in records)
