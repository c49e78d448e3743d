"""A training run that SIGKILLs itself at one fault point, for the crash-and-resume tests.

    python -m tests.helpers.crash_run CONFIG POINT STEP

``POINT`` is a `Trainer` fault point: ``before_rename`` (inside checkpoint STEP's write, before it becomes
visible) or ``after_checkpoint`` (right after checkpoint STEP is complete).
"""

from __future__ import annotations

import os
import signal
import sys

from finetune.args import TrainArgs
from finetune.distributed import destroy_distributed
from finetune.logging_utils import setup_logging
from finetune.trainer import Trainer


def kill_at(point: str, step: int):
    def hook(where: str, at_step: int) -> None:
        if (where, at_step) == (point, step):
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(config: str, point: str, step: str) -> None:
    setup_logging()
    trainer = Trainer(TrainArgs.load(config), device="cpu", fault_hook=kill_at(point, int(step)))
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
