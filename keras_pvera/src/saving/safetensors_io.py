"""Reading and writing safetensors files and small text files, safely.

Adapter files are safetensors files: a JSON header, then raw tensor bytes.
Reading one never runs code (no pickle) and needs only NumPy, not torch.

Every write here is atomic: the data goes to a temporary file beside the
target, which then replaces the target with `os.replace`. An interrupted
write leaves the target as it was (absent, or the previous file) and removes
the temporary file.
"""

import contextlib
import os
import uuid
import zipfile

import numpy as np
import safetensors
import safetensors.numpy


@contextlib.contextmanager
def atomic_path(path):
    """Gives a temporary path beside `path` that replaces `path` on success.

    Args:
        path: The file to write.

    Yields:
        A path in the same folder to write to. When the `with` block ends
        normally it replaces `path`; when it raises, it is deleted and `path`
        is left untouched.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with atomic_path(path) as tmp:
    ...     with open(tmp, "w") as f:
    ...         _ = f.write("done")
    >>> open(path).read()
    'done'
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Cannot write {path!r}: the folder {folder!r} does not exist."
        )
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"Cannot write the file {path!r}: it is an existing folder."
        )
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    open(tmp, "xb").close()
    # The file keeps the mode of the one it replaces, else gets the usual
    # mode of a new file (writers may recreate `tmp` private to its owner).
    source = path if os.path.isfile(path) else tmp
    mode = os.stat(source).st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _fsync(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_safetensors(path, tensors, metadata):
    """Writes NumPy arrays and string metadata to a safetensors file, atomically.

    Args:
        path: The file to write.
        tensors: A dict from tensor name to NumPy array.
        metadata: A dict from string to string, stored in the header.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.safetensors")
    >>> write_safetensors(path, {"w": np.ones(3)}, {"format": "np"})
    >>> os.path.isfile(path)
    True
    """
    tensors = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        safetensors.numpy.save_file(tensors, tmp, metadata=metadata)


def write_text(path, text):
    """Writes a UTF-8 text file atomically.

    Args:
        path: The file to write.
        text: The file's content.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def read_safetensors(path):
    """Reads every tensor and the metadata of a safetensors file.

    Args:
        path: The file to read.

    Returns:
        A tuple `(tensors, metadata)`: a dict from name to NumPy array, and
        the header's string metadata (an empty dict if it has none).

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If `path` is not a complete safetensors file (truncated,
            corrupt, or another format, such as a `.keras` archive).

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.safetensors")
    >>> write_safetensors(path, {"w": np.ones(3)}, {"format": "np"})
    >>> tensors, metadata = read_safetensors(path)
    >>> tensors["w"].tolist(), metadata
    ([1.0, 1.0, 1.0], {'format': 'np'})
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {path!r}")
    if zipfile.is_zipfile(path):
        raise ValueError(
            f"{path!r} is a zip archive, such as a whole model saved as "
            "`.keras`, not a safetensors file. Load a `.keras` model with "
            "`keras.saving.load_model(path)` (after `import keras_pvera`); "
            "adapter files are the ones `save_adapter` writes."
        )
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except safetensors.SafetensorError as e:
        raise ValueError(
            f"{path!r} is not a complete safetensors file (it may be "
            f"truncated, corrupt, or of another format): {e}"
        ) from None
    return tensors, metadata
