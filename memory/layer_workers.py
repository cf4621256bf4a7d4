"""The CPU layer workers: a batch's layers extracted side by side, one BLAS thread each.

After an error or cancel the workers are shut down without waiting for a stuck one (at most
``WORKER_STOP_S``), so a worker that never returns cannot freeze the caller.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from ..extract.waits import join_for

# After an error or cancel: how long a layer worker still running is waited for.
WORKER_STOP_S = 0.4


def cpu_workers(device: torch.device, batch_size: int, batched_svd: bool) -> int:
    """Threads that extract a batch's layers side by side on a CPU (1: one after another).

    On a CPU the batch's layers run in parallel threads with one BLAS thread each, instead of
    one layer at a time on every core: the tall-skinny QRs and small matmuls of an extraction
    scale poorly across threads, and on a busy machine multi-threaded BLAS regions stall
    (measured 5-10x slower than single-threaded ones on a loaded 2-core runner).
    """
    if device.type != "cpu" or batched_svd:
        return 1
    return max(1, min(batch_size, os.cpu_count() or 1))


def init_layer_worker() -> None:
    """Thread-pool initializer, run in each layer worker thread itself.

    One intra-op thread, set here: torch keeps MKL's thread count per thread
    (``mkl_set_num_threads_local``), so the main thread's ``set_num_threads(1)`` does not reach a
    new thread until its first ATen-parallel operation; until then its BLAS/LAPACK calls run on
    every core, and which layer a worker happened to take first decided its bytes (streamed files
    differed from run to run). No autograd: grad mode is per thread too, and the host's
    ``inference_mode`` (ComfyUI) does not reach our threads.
    """
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)


@contextmanager
def layer_parallel(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """A thread pool for the layers, with torch limited to one intra-op thread meanwhile."""
    if workers <= 1:
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    threads: list[threading.Thread] = []

    def init() -> None:
        threads.append(threading.current_thread())
        init_layer_worker()

    ex = ThreadPoolExecutor(workers, thread_name_prefix="lora-extract-layer", initializer=init)
    try:
        yield ex
    except BaseException:
        # Cancelled or failed: idle workers end at once; one stuck in a layer is waited for at
        # most WORKER_STOP_S, then left to end on its own (the caller must not freeze).
        ex.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + WORKER_STOP_S
        for t in list(threads):
            join_for(t, max(0.0, deadline - time.monotonic()))
        raise
    else:
        ex.shutdown(wait=True)   # every future was consumed: the workers are idle
    finally:
        torch.set_num_threads(before)
