"""TensorBoard: ``RUN/tensorboard/`` event files through PyTorch's ``SummaryWriter`` (``tensorboard --logdir``).

Scalars as ``metrics.csv``'s columns, the config as hyper-parameters (the HParams tab) and as text, the
validation images under ``val_images/<image name>``. On resume the writer opens with ``purge_step`` at the
resumed step: what was logged from there on before the interruption is hidden, and the resumed run logs it
again, so every step is shown once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from samft.engine.train.loggers import Images, Tracker, import_package


def _hparam(value: Any) -> Any:
    """A value TensorBoard's hparams accept (numbers, strings, booleans); lists and nulls as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, log_dir: Path, resume_step: Optional[int] = None) -> None:
        import_package("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resume_step)
        self.replay_from = resume_step
        self.starts_empty = not resume_step  # resumed at step 0: everything was purged, the config too

    def hparams(self, params: dict[str, Any], config_yaml: str, metric: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams({k: _hparam(v) for k, v in params.items()}, {f"val_{metric}": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "    " + config_yaml.rstrip("\n").replace("\n", "\n    "), 0)
        self.writer.flush()

    def scalars(self, step: int, values: dict[str, float], walltime: float) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step, walltime=walltime)
        self.writer.flush()  # a row is on disk once logged: only steps after the saved state can be lost

    def images(self, step: int, images: Images) -> None:
        for name, image in images:
            self.writer.add_image(f"val_images/{name}", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self, status: str, files: list[Path]) -> None:
        self.writer.close()
