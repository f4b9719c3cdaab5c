"""`megacpt train` whose ranks stop answering at one iteration: the node a multi-node test loses.

    MEGACPT_TEST_PAUSE_AT=6 MEGACPT_TEST_PAUSED=/tmp/paused torchrun ... -m tests.distributed.pausing_train \\
        train --config ... key=value ...

Set in one agent's environment only, so only that node's ranks stop: right after optimizer step N (before
its log line and its checkpoint, if N is a save iteration) each touches ``MEGACPT_TEST_PAUSED.<rank>`` and
sleeps. The other nodes' ranks then wait in the next collective, as they would for a hung node, until the
test kills this node (a lost node) or the collective timeout ends them (a hung node).
"""
import os
import sys
import time
from pathlib import Path

from megacpt.cli import main
from megacpt.train import cli, trainer


def _train(job, on_step=None):
    at = int(os.environ["MEGACPT_TEST_PAUSE_AT"])

    def pause(iteration: int, loss: float) -> None:  # after the step, before its log line and checkpoint
        if iteration == at:
            Path(f"{os.environ['MEGACPT_TEST_PAUSED']}.{os.environ.get('RANK', '0')}").touch()
            time.sleep(3600)

    return trainer.train(job, on_step=pause)


if __name__ == "__main__":
    if os.environ.get("MEGACPT_TEST_PAUSE_AT"):
        cli.train = _train  # what `megacpt train` calls
    sys.exit(main(sys.argv[1:]))
