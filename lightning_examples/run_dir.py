"""Where an example writes: one run folder, ``./runs/<example>-<UTC time>/``, never the current directory.

:class:`RunDirCLI` sets the Trainer's ``default_root_dir`` to that folder (unless
``--trainer.default_root_dir`` gives another) and, when the config leaves ``trainer.logger`` unset
or ``true``, logs to a ``CSVLogger`` writing ``metrics.csv``, ``hparams.yaml`` and the saved
``config.yaml`` straight into it; checkpoints go to its ``checkpoints/``. :func:`in_run_dir` puts
a relative output path (a PNG) there too.

Example:
    >>> import datetime
    >>> default_run_dir("char_lm", now=datetime.datetime(2026, 12, 1, 9, 30, 5))
    'runs/char_lm-20261201-093005'
    >>> in_run_dir("runs/x", "acc.png"), in_run_dir("runs/x", "/tmp/acc.png")
    ('runs/x/acc.png', '/tmp/acc.png')
"""

from __future__ import annotations

import datetime
import os

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI


def default_run_dir(example: str, now: datetime.datetime | None = None) -> str:
    """``runs/<example>-<UTC time>``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return os.path.join("runs", f"{example}-{now.strftime('%Y%m%d-%H%M%S')}")


def in_run_dir(root: str, path: str) -> str:
    """``path`` under ``root`` when relative, else ``path``."""
    return os.path.join(root, path)


class RunDirCLI(LightningCLI):
    """A LightningCLI whose Trainer writes under one run folder (see the module docstring).

    Subclasses set ``example`` (the folder's prefix)."""

    example = "example"

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        trainer.default_root_dir = trainer.default_root_dir or default_run_dir(self.example)
        if trainer.logger is None or trainer.logger is True:
            trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                       init_args=Namespace(save_dir=trainer.default_root_dir, name="", version=""))

    @property
    def run_dir(self) -> str:
        """The run folder of this CLI's Trainer."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        return config.trainer.default_root_dir

    def announce(self) -> None:
        """Print the run folder, if anything was written there."""
        if os.path.isdir(self.run_dir):
            print(f"results written to {self.run_dir}", flush=True)
