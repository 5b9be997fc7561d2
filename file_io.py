"""Files the tool writes and the names it shows: atomic writes, names within the file system's limit,
paths as valid UTF-8 text, content digests."""
import hashlib
import os
import secrets


def name_limit(folder):
    """Longest file name, in bytes, that the file system holding `folder` (or its nearest existing
    ancestor) accepts."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder, 'PC_NAME_MAX')
    except (OSError, ValueError, AttributeError):
        return 255


def shorten_name(name, limit):
    """`name` (a file name) if it fits `limit` bytes, else deterministically shortened to fit: a
    readable prefix, '~', 10 hex digits of the SHA-1 of the whole name, and the extension."""
    encoded = os.fsencode(name)
    if len(encoded) <= limit:
        return name
    stem, extension = os.path.splitext(encoded)
    if len(extension) > 16:
        extension = b''
    tag = b'~' + hashlib.sha1(encoded).hexdigest()[:10].encode()
    cut = max(0, limit - len(tag) - len(extension))
    while 0 < cut < len(stem) and 0x80 <= stem[cut] < 0xC0:  # never split a UTF-8 character
        cut -= 1
    return os.fsdecode(stem[:cut] + tag + extension)


def fit_path(path):
    """`path` with its file name shortened (see shorten_name) if the file system would refuse it:
    for output names derived from input names."""
    folder, name = os.path.split(path)
    return os.path.join(folder, shorten_name(name, name_limit(folder or '.')))


def create_temporary(path, suffix):
    """A new file beside `path` -> (fd, temporary path): hidden, unique, its name within the file
    system's limit however long `path`'s is, and created with mode 0666 less the user's umask (so
    the file renamed into place has the mode any new file of the user would have)."""
    folder, name = os.path.split(os.path.abspath(path))
    random_part = secrets.token_hex(4)
    room = name_limit(folder) - len(f'..{random_part}{suffix}')
    for _ in range(100):
        temporary = os.path.join(folder, f'.{shorten_name(name, room)}.{random_part}{suffix}')
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_CLOEXEC', 0), 0o666), \
                temporary
        except FileExistsError:
            random_part = secrets.token_hex(4)
    raise FileExistsError(f'no free temporary name beside {path}')


def atomic_write_bytes(path, data):
    """Write `data` to `path` through a temporary file in the same folder and a rename,
    so a reader never sees a half-written file; on any failure (Ctrl-C included) nothing is left."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = create_temporary(path, '.tmp')
    except OSError as e:
        raise OSError(f'cannot write {path}: {e.strerror or e}') from None
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(f'cannot write {path}: {e.strerror or e}') from None
        raise


def display_path(path):
    """`path` as valid UTF-8 text for logs, figures and JSON: bytes that are not UTF-8 (file names
    decoded with surrogate escapes) shown as \\xNN."""
    try:
        return os.fsencode(path).decode('utf-8', 'backslashreplace')
    except UnicodeEncodeError:  # a str with lone surrogates that no file system name produced
        return path.encode('utf-8', 'backslashreplace').decode('utf-8')
    except TypeError:
        return str(path)


def file_sha256(path):
    """Hex SHA-256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
