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


def _install(log_path: str, model_dir: str, allowed: list[str]) -> None:
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


if __name__ == "__main__":
    limit = int(os.environ.pop("BNCHECK_FUZZ_RLIMIT_AS", "0"))
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    log, model_dir, allowed_json, sep, *rest = sys.argv[1:]
    assert sep == "--"
    _install(log, model_dir, json.loads(allowed_json))
    sys.argv = ["bncheck", *rest]
    from bncheck.cli import main

    main()
