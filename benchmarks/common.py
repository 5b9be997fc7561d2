"""What several benchmarks share: repeated inputs as links, and the CLI timed in a fresh process."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Timed inside the child after its imports; the child's own VmHWM, as ru_maxrss would carry the
# (large) parent's peak across fork + exec.
_CLI_CHILD = ('import sys, time; sys.path.insert(0, sys.argv[1]); import mahalanobisad, evaluate; '
              't = time.perf_counter(); c = mahalanobisad.run(sys.argv[2:]); '
              'print(time.perf_counter() - t, evaluate.peak_memory_mb()); sys.exit(c)')


def repeated(paths, count):
    """`count` paths: `paths` over and over."""
    return [paths[i % len(paths)] for i in range(count)]


def link_inputs(paths, folder):
    """Fill `folder` with numbered symbolic links to `paths` (repeats allowed, so every input is a file
    of its own and decoded for real) -> folder."""
    os.makedirs(folder, exist_ok=True)
    for i, path in enumerate(paths):
        os.symlink(os.path.abspath(path), os.path.join(folder, f'{i:06d}.png'))
    return folder


def cli_in_child(argv, cwd=None):
    """mahalanobisad.run(argv) in a fresh Python process -> (seconds from after its imports to its
    exit, its peak resident memory in MiB); a non-zero exit raises CalledProcessError."""
    out = subprocess.run([sys.executable, '-c', _CLI_CHILD, ROOT] + list(argv), capture_output=True, text=True,
                         check=True, cwd=cwd).stdout.split()
    return float(out[-2]), float(out[-1])
