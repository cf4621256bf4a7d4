"""One intra-op thread for a helper thread (the reader) that runs beside CPU compute.

torch's CPU operations run on an OpenMP thread team per calling thread. A reader thread that
forms differences with torch operations starts a second team the size of the machine next to
the compute thread's, and that alone slows the compute's matrix products, even while the
reader waits: measured on a 2-core CPU (SDXL-like pair, rank 32), the decomposition took
1.8-2.1 s beside a reader thread with its own team against 1.45-1.57 s beside one limited to a
single thread, and 1.41-1.61 s with the reads in the compute thread itself.

``torch.set_num_threads`` is no use here: it also sets process-wide state (the default for new
threads, MKL's count) that the compute thread sees. The OpenMP runtime's
``omp_set_num_threads`` sets the calling thread's count only. It is looked up in the OpenMP
library torch ships with (falling back to the process's symbols), and a call only counts when
torch then reports one thread in this thread; otherwise nothing changes (best effort: a torch
built without OpenMP has no second team to avoid).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# The OpenMP runtimes torch's wheels ship in torch/lib: GNU (Linux), LLVM (macOS), Intel.
_OPENMP_LIBRARIES = ("libgomp*.so*", "libomp*.dylib", "libiomp5*", "libomp*.so*")

_setter: Callable[[int], object] | None = None
_looked_up = False


def _candidate_setters() -> list[Callable[[int], object]]:
    found: list[Callable[[int], object]] = []
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    paths = [p for pattern in _OPENMP_LIBRARIES for p in sorted(glob.glob(os.path.join(lib_dir, pattern)))]
    for path in paths:
        try:
            found.append(ctypes.CDLL(path).omp_set_num_threads)
        except (OSError, AttributeError):
            continue
    if sys.platform != "win32":
        try:
            found.append(ctypes.CDLL(None).omp_set_num_threads)
        except (OSError, AttributeError, TypeError):
            pass
    return found


def limit_this_thread_to_one_op_thread() -> bool:
    """Run this thread's torch CPU operations on one thread; True if that took effect.

    Call it first thing in a helper thread, before the thread's first torch operation. Other
    threads (the compute thread among them) keep their own counts.
    """
    global _setter, _looked_up
    if torch.get_num_threads() == 1:
        return True
    candidates = [_setter] if _setter is not None else ([] if _looked_up else _candidate_setters())
    _looked_up = True
    for setter in candidates:
        setter(1)
        if torch.get_num_threads() == 1:
            _setter = setter
            return True
    log.debug("could not limit the reader thread to one intra-op thread (no OpenMP runtime "
              "found); it shares the cores with the compute thread's team")
    return False
