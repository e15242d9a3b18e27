"""An annotator that fails on purpose, for the fault-isolation tests. It lives in a plain module
(not a test file) so Ray workers can import it: the job hands the driver's registry entries to its
actors, and Ray puts the driver's working directory (the repository root) on the workers' path."""

from __future__ import annotations

import os
import signal
import time

from annotators.caption import SourceCaption

TARGET = "tests.pipelines.faulty_annotators:FaultyCaption"


class FaultyCaption(SourceCaption):
    """The source caption, except on an image whose caption is a fault's name:

    - ``raise``: ValueError, every time;
    - ``memory``: MemoryError, every time;
    - ``die``: SIGKILLs its own process, every time;
    - ``block``: the first time (no ``pid_file`` yet), writes its pid to ``pid_file`` and waits to
      be killed (at most 120 s, then raises); later attempts caption it normally.
    """

    name = "faulty-caption"
    default_options = {"pid_file": ""}

    def __call__(self, images: list, captions: list[str | None] | None = None) -> list[str]:
        for caption in captions or []:
            if caption == "raise":
                raise ValueError("this image cannot be captioned")
            if caption == "memory":
                raise MemoryError("cannot allocate 64 GiB")
            if caption == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            if caption == "block" and not os.path.exists(self.options["pid_file"]):
                partial = self.options["pid_file"] + ".partial"
                with open(partial, "w") as handle:
                    handle.write(str(os.getpid()))
                os.replace(partial, self.options["pid_file"])
                time.sleep(120)
                raise RuntimeError("blocked for 120 s and nobody killed this process")
        return super().__call__(images, captions)
