"""The run's writer: PNG encoding, the atomic image write and fsync, then the image's
manifest line, on a thread of its own, so the device renders the next batch meanwhile.

One thread takes a bounded queue in order, so an image's manifest line still follows its
file and failures keep their place. close() writes everything queued (after a Ctrl-C too)
before the run folder is closed. A write that fails stops the writer and is raised in the
run at its next call, never swallowed. A kill loses only queued images, which the manifest
does not vouch for: a resume renders them again.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from PIL import Image

from sdbatch.output import png
from sdbatch.output.run_folder import RunFolder

THREADED = True  # benchmarks/writer_wall.py turns it off to measure what the thread saves
QUEUED_IMAGES = 16  # past this the renderer waits: a slow disk cannot fill the memory


class WriteError(RuntimeError):
    """An image or manifest line could not be written; the run stops."""


class Writer:
    def __init__(self, folder: RunFolder, threaded: bool | None = None):
        self.folder = folder
        self._error: BaseException | None = None
        self._failed = False
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(QUEUED_IMAGES)
        self._thread = None
        if THREADED if threaded is None else threaded:
            self._thread = threading.Thread(target=self._work, name="sdbatch-writer",
                                            daemon=True)
            self._thread.start()

    def image(self, name: str, image: Image.Image, infotext: str, recipe: dict[str, Any],
              entry: dict[str, Any]) -> None:
        """Encode and write one image, then its manifest line (queued)."""
        def write() -> None:
            self.folder.write_image(name, png.encode(image, infotext, recipe), entry)
        self._put(write)

    def failure(self, entry: dict[str, Any], error: str) -> None:
        """Record a failed image in the manifest (queued behind the images before it)."""
        self._put(lambda: self.folder.write_failure(entry, error))

    def close(self) -> None:
        """Write everything queued, then stop; raise the writer's error if one is pending."""
        stopping: SystemExit | None = None
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            while self._thread.is_alive():
                try:
                    self._thread.join()
                except KeyboardInterrupt:  # a second Ctrl-C: the queue is short, finish it
                    continue
                except SystemExit as e:  # submitit requeuing the task: it ends once written
                    stopping = e
        if stopping is not None:
            raise stopping
        self._raise()

    def _put(self, write: Callable[[], None]) -> None:
        self._raise()
        if self._thread is None:
            self._do(write)
            self._raise()
        else:
            self._queue.put(write)

    def _do(self, write: Callable[[], None]) -> None:
        if self._failed:
            return  # nothing after a failed write: the manifest stays in order
        try:
            write()
        except Exception as e:  # noqa: BLE001 - handed to the run's thread by _raise
            self._error, self._failed = e, True

    def _work(self) -> None:
        while (write := self._queue.get()) is not None:
            self._do(write)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise WriteError(f"cannot write into {self.folder.path}: {error}") from error
