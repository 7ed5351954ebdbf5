"""Ending an asyncio loop that a test rig runs on its own thread (`loop.run_forever()`).

Stopping such a loop is not enough: a task still pending on it (a shell's timer, a server's
lifespan) is destroyed later by the garbage collector, at a random point of another test. On
CPython 3.11 one such destruction (uvicorn formatting a traceback for its GeneratorExit, nested
inside an AST conversion the collection interrupted) failed an unrelated test with "AST
constructor recursion depth mismatch". So every rig ends its loop as `asyncio.run` does:
cancel and await what is left, shut the async generators down, stop, join, close.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


def finish_loop_thread(
    loop: asyncio.AbstractEventLoop,
    thread: threading.Thread,
    last: Callable[[], None] | None = None,
    timeout: float = 10.0,
) -> None:
    """Run `last` on the loop, cancel and await every other task, stop the loop, join its thread
    and close the loop. Safe to call when the loop has already stopped."""

    async def finish() -> None:
        if last is not None:
            last()
        current = asyncio.current_task()
        leftovers = [task for task in asyncio.all_tasks() if task is not current]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        await loop.shutdown_asyncgens()

    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
    if not thread.is_alive() and not loop.is_closed():
        loop.close()
