"""`rfclip-backend worker` with the fault the kill test plants: it SIGKILLs itself right after
pushing the first half of its first chunk, leaving the chunk running in RQ's eyes."""
import os
import signal
import sys

from backend import cli
from backend.jobs import studio


class DyingStudio(studio.Studio):
    def push(self, project, predictions):
        super().push(project, list(predictions)[:max(1, len(predictions) // 2)])
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    studio.Studio = DyingStudio  # in this process only: the worker command builds its Studio from here
    sys.exit(cli.main(["worker"]))
