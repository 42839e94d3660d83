"""Training checkpoints: the manager of the latest and the best step, for resume.

They live in `<run>/orbax/<step>/{model,opt,meta}`; Orbax finalises a step atomically (a half-written step is never
listed). The inference export that training writes at the end, and that serving loads, is `flaxtumor.checkpoints`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from flaxtumor.checkpoints import _abstract, _load_into

# RNG keys are rebuilt from the seed; their counters (RngCount) are saved, which is the whole RNG state.
TRAIN_STATE = nnx.Not(nnx.RngKey)


class _NoMetricsWarning(logging.Filter):
    """Mid-epoch saves have no validation metrics by design; Orbax warns about each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsWarning())


# ---------------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------------------------------


class TrainCheckpoints:
    """Keeps the latest step (resume) and the best step by `metric` (higher is better).

    Mid-epoch saves carry no metrics: they are kept only while they are the latest.
    """

    def __init__(self, directory: Path, metric: str):
        self.metric = metric
        best = lambda metrics: float(metrics[metric])  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            best_fn=best,
            best_mode="max",
            preservation_policy=AnyPreservationPolicy(
                [LatestN(n=1), BestN(get_metric_fn=best, n=1, keep_checkpoints_without_metrics=False)]
            ),
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options, item_names=("model", "opt", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(
        self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, meta: dict, metrics: dict | None = None
    ) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, TRAIN_STATE))),
                opt=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=metrics,
            force=True,
        )

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None = None) -> None:
        """Loads step `step` into the live (already placed) model, and the optimizer when given."""
        self.manager.wait_until_finished()
        items = {"model": ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(nnx.state(model, TRAIN_STATE))))}
        if optimizer is not None:
            items["opt"] = ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(nnx.state(optimizer))))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        _load_into(model, restored.model, TRAIN_STATE)
        if optimizer is not None:
            _load_into(optimizer, restored.opt)

    def path(self, step: int) -> Path:
        return Path(self.manager.directory) / str(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
