"""Imported only by the embedding workers' forkserver (first in its preload list, pipeline/embed/loop.py): moves that
server, and so every worker it forks, into a process group of its own.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group. The run's main process handles it (stops the
run, ends its workers); a worker that got the same signal could die of it first, and its shard's task then failed with
"DataLoader worker exited unexpectedly" before the run knew it was being stopped. Setting SIG_IGN in the worker's init
leaves a window (the forkserver restores default handlers in each child before the init runs); a process group of
their own has none. Killed runs are still cleaned up: pipeline/reaper.py follows parent links, not process groups.

It also registers every Pillow format plugin once, in the server: Pillow imports them all on the first image a process
opens, which cost each worker 0.15 s on its first item, in every shard.
"""
from __future__ import annotations

import os

from PIL import Image

if hasattr(os, "setpgid"):
    try:
        os.setpgid(0, 0)
    except OSError:  # not permitted (e.g. already a session leader): the workers' SIG_IGN still covers most of the window
        pass

Image.init()
