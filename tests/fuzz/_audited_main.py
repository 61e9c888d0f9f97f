"""Run bncheck's CLI with an audit hook that records every file opened outside the allowed folders.

Used by the fuzz harness as ``python _audited_main.py LOG MODEL_DIR ALLOWED_DIRS_JSON -- bncheck-args...``. Python's
audit "open" event covers builtins.open, io.open and os.open (onnx, numpy, zipfile, tempfile); files opened
by C libraries (HDF5, onnxruntime) are caught by the harness's inotify watch on its canary folder instead.
The recorded paths are written to LOG at exit, never to stderr, which belongs to the CLI under test.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections.abc import Callable


def install(log_path: str, model_dir: str, allowed: list[str]) -> Callable[[], None]:
    """Install the hook; returns the function that writes the log (registered at exit too)."""
    roots = tuple(os.path.realpath(p).rstrip("/") + "/" for p in [model_dir, *allowed])
    # imports open thousands of files under the interpreter's folders: a prefix test spares them realpath;
    # the model's folder always gets realpath, since a hostile input may hold a symlink that leads out
    system = tuple(p.rstrip("/") + "/" for p in allowed) + tuple(r for r in roots if r != roots[0])
    outside: list[str] = []
    seen: set[str] = {log_path}

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return  # open(fd) and friends carry an int: nothing new is opened
        path = os.fsdecode(args[0])
        if path in seen:
            return
        seen.add(path)
        if os.path.isabs(path) and path.startswith(system) and "/../" not in path:
            return
        real = os.path.realpath(path) + ("/" if os.path.isdir(path) else "")
        if not real.startswith(roots):
            outside.append(real)

    def flush() -> None:
        with open(log_path, "w", encoding="utf-8") as handle:
            json.dump(outside, handle)

    atexit.register(flush)
    sys.addaudithook(hook)
    return flush


def run_forked(
    args: list[str],
    log_path: str,
    model_dir: str,
    allowed: list[str],
    out_path: str,
    err_path: str,
    env: dict[str, str],
) -> None:
    """The body of a run in a process forked from the harness's fork server (bncheck and its libraries
    already imported there, nothing run): the same main, hook and limits as the script form, without paying
    the interpreter's start and imports per run (the long profile's thousands of runs)."""
    import tempfile

    os.environ.clear()
    os.environ.update(env)
    os.chdir(model_dir)
    tempfile.tempdir = None  # the fork server may have cached the harness's temporary folder
    limit = int(os.environ.pop("BNCHECK_FUZZ_RLIMIT_AS", "0"))
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    flush = install(log_path, model_dir, allowed)
    from bncheck.cli import main

    code = 0
    try:
        main(args=args, prog_name="bncheck")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # what python would print and exit 1 for
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    flush()
    os._exit(code)


if __name__ == "__main__":
    limit = int(os.environ.pop("BNCHECK_FUZZ_RLIMIT_AS", "0"))
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    log, model_dir, allowed_json, sep, *rest = sys.argv[1:]
    assert sep == "--"
    install(log, model_dir, json.loads(allowed_json))
    sys.argv = ["bncheck", *rest]
    from bncheck.cli import main

    main()
