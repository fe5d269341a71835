"""A worker process started ahead of its round: it imports torch, then waits for its rank.

``python -m adaptrun.agents.warm_start -- train.py ARGS`` (or ``-- -m module ARGS``) imports
what every worker needs first (torch, torch.distributed, the optimizers and torch._dynamo,
which the first optimizer step imports; adaptrun when installed): the 1-2 s of a worker's
cold start that does not depend on the round. It then writes one byte to the file
descriptor named by ``ADAPTRUN_WARM_READY_FD`` ("ready"), reads one JSON line on stdin (the
round's environment: RANK, WORLD_SIZE, MASTER_PORT, ...), applies it to ``os.environ`` and
runs the script as ``__main__`` with ``runpy``, as ``python train.py ARGS`` would. An empty
stdin (the agent went away, or gave up the spare) ends it with exit code 0. The rest of
stdin stays open as the agent's channel to the worker (``ADAPTRUN_AGENT_FD``).

The agent starts these while the old world still trains, so a re-form costs the save, the
rendezvous and the script's own set-up, not the interpreter's start.
"""
from __future__ import annotations

import json
import os
import runpy
import sys

_script_globals: dict | None = None


def _preload() -> None:
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.optim  # noqa: F401
    for name in ("torch._dynamo", "adaptrun"):
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a preload is an optimisation only
            pass


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        sys.exit("usage: python -m adaptrun.agents.warm_start -- train.py ARGS")
    _preload()
    fd = os.environ.pop("ADAPTRUN_WARM_READY_FD", "")
    if fd:
        try:
            os.write(int(fd), b"r")
            os.close(int(fd))
        except OSError:
            pass
    line = b""
    while not line.endswith(b"\n"):     # unbuffered: what follows is the agent's channel
        chunk = os.read(0, 1)
        if not chunk:
            break
        line += chunk
    if not line.strip():
        sys.exit(0)
    os.environ.update(json.loads(line))
    # The rest of the pipe is the agent's channel to this worker (an in-process re-form
    # learns its next world there); the script's stdin becomes /dev/null.
    os.environ["ADAPTRUN_AGENT_FD"] = str(os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    global _script_globals
    # Keep the script's globals alive until the interpreter's own finalization, as under
    # `python train.py`: dropping them when runpy returns would destroy the script's objects
    # (a DDP model, a process group) before torch's atexit handlers run, which can hang.
    if args[0] == "-m":
        sys.argv = [args[1]] + args[2:]
        _script_globals = runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
        _script_globals = runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
