"""The training loop: `run(cfg) -> summary`.

A run is named steps: `set_up` (sharding, data and split, checkpoints/resume, model), then per phase `run_phase`
(optimizer and schedule), whose epochs are `train_epoch` and the end-of-epoch bookkeeping (`end_of_epoch`, pure),
and finally `export`. `cls` from pretrained weights (ImageNet or in-domain) runs phase 1 (frozen backbone), phase 2
(last stage unfrozen at a lower LR) and optionally phase 3 (everything, lower still), each with its own early stopping
and each starting from the best checkpoint so far; the export is the best over all phases. Everything else is one
phase. Which epoch is "best" is the run's `Selection` (flaxtumor/train/selection.py): the best on the validation
patients, or, with `--fold all` (no validation patients), the last epoch, with no early stopping.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from flaxtumor.config import ALL_FOLDS, Config, TrainConfig
from flaxtumor.data.io import DataError
from flaxtumor.data.lgg import (
    Patient, Slice, Split, kfold_splits, load_dataset, load_split, patient_split, save_split, select,
)
from flaxtumor.data.pipeline import epoch_length, steps_per_epoch, train_batches
from flaxtumor.data.preprocess import Preprocessing
from flaxtumor.models import build_model
from flaxtumor.models.classifier import load_backbone, set_phase
from flaxtumor.train import sharding
from flaxtumor.checkpoints import export_inference, init_from, library_versions
from flaxtumor.train.checkpoint import TrainCheckpoints
from flaxtumor.train.losses import LossFn, make_loss, uses_deep_supervision
from flaxtumor.train.selection import Selection, make_selection
from flaxtumor.train.validation import evaluate  # noqa: F401 (loop.evaluate: the tests score exports with it)

log = logging.getLogger(__name__)

EXPORT_NAME = {"cls": "classifier", "seg": "segmenter"}


class NonFiniteLoss(RuntimeError):
    """Training diverged; the message names the step and the last good checkpoint."""


class RunExists(RuntimeError):
    """The run folder already holds checkpoints and --resume was not given."""


class TrainingLeak(RuntimeError):
    """A slice of a patient outside the split's training patients reached a training batch."""


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint so --resume continues exactly."""

    phase_index: int = 0  # which of the run's phases
    epoch: int = 0  # within the phase
    step_in_epoch: int = 0
    global_step: int = 0
    data_epoch: int = 0  # epochs over all phases: seeds the shuffle, so phase 2 does not replay phase 1's order
    best: float = -math.inf  # best validation metric of this phase (early stopping)
    bad_epochs: int = 0
    loss_sum: float = 0.0  # this epoch's training loss so far
    history: list[dict[str, Any]] = field(default_factory=list)
    trained_patients: list[str] = field(default_factory=list)  # whose slices reached a training batch (this process)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def _slices(patients: Sequence[Patient]) -> list[Slice]:
    return [s for p in patients for s in p.slices]


def fold_split(patients: Sequence[Patient], folds: int, fold: int | str, seed: int) -> Split:
    """Fold `fold` (0-based) of `folds` patient-level folds stratified by tumour share (`kfold_splits`): the fold's
    patients are the validation set, every other patient trains, and there is no test set. Fold "all" (nnU-Net's):
    every patient trains, and there is neither a validation nor a test set."""
    if fold == ALL_FOLDS:
        return Split(tuple(sorted(p.patient_id for p in patients)), (), (), seed)
    if not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} is outside 0..{folds - 1} of {folds} folds")
    held_out = kfold_splits(patients, folds, seed, val_fraction=0.0)[fold]
    return Split(held_out.train, held_out.test, (), seed)


def choose_split(cfg: Config, patients: Sequence[Patient], saved: Path) -> Split:
    """A resumed run keeps its own split (whatever the seeds or fractions say now); else the fold or the split."""
    if cfg.train.resume and saved.is_file():
        return load_split(saved)
    if cfg.data.fold is not None:
        if cfg.data.split_file:
            raise DataError(cfg.data.split_file, "--split and --fold exclude each other (a fold makes its own split)")
        return fold_split(patients, cfg.data.folds, cfg.data.fold, cfg.data.split_seed)
    return patient_split(cfg.data, patients)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


def forward(model: nnx.Module, images: jax.Array, compute_dtype: Any, deep: bool = False) -> Any:
    """float32 logits (`deep`: the tuple of `model.deep_logits`, for deep supervision); with bfloat16 compute the
    float32 master weights are cast for this call only."""
    call = (lambda m, x: m.deep_logits(x)) if deep else (lambda m, x: m(x))
    as_f32 = lambda out: jax.tree.map(lambda a: a.astype(jnp.float32), out)  # noqa: E731
    if compute_dtype == jnp.float32:
        return as_f32(call(model, images))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    low = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(compute_dtype), params), rest)
    logits = as_f32(call(low, images.astype(compute_dtype)))
    # BatchNorm statistics and RNG counters moved in the low-precision copy: keep them, in their own dtypes.
    moved = nnx.state(low, nnx.Not(nnx.Param))
    nnx.update(model, jax.tree.map(lambda new, old: new.astype(old.dtype), moved, nnx.state(model, nnx.Not(nnx.Param))))
    return logits


def compute_dtype(precision: str) -> Any:
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig, lr: float, total_steps: int, steps_per_epoch: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay on kernels only) under warmup+cosine or one-cycle."""
    total_steps = max(total_steps, 1)
    if cfg.schedule == "onecycle":
        schedule = optax.cosine_onecycle_schedule(total_steps, lr)
    else:
        warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps - 1)
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=lr * 0.01)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731 — no decay on BN/bias
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Sharding-aware steps (the mesh comes from how the state and batch were placed)
# ---------------------------------------------------------------------------------------------------------------------


def make_train_step(loss_fn: LossFn, wrt: Any, dtype: Any, deep: bool = False) -> Callable[..., dict[str, jax.Array]]:
    """One optimizer step on a global batch; model and optimizer are donated and updated in place. `deep`: the loss
    takes the model's deep-supervision outputs."""

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        def loss_of(model: nnx.Module) -> jax.Array:
            return loss_fn(forward(model, batch["image"], dtype, deep), batch)

        loss, grads = nnx.value_and_grad(loss_of, argnums=nnx.DiffState(0, wrt))(model)
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
        # A non-finite gradient poisons the weights even when the loss was finite: report it as a NaN loss.
        return {"loss": jnp.where(jnp.isfinite(grad_norm), loss, jnp.nan), "grad_norm": grad_norm}

    return train_step


def bind_train_step(train_step: Callable[..., Any], model: nnx.Module, optimizer: nnx.Optimizer) -> Callable[..., Any]:
    """`train_step` with model and optimizer bound, as a function of the batch alone. nnx.cached_partial walks their
    graph once instead of on every call: on an H100 that walk cost a ResNet50 step more than its compute. The
    weights it updates are the model's own, so checkpoints and validation see every step."""
    return nnx.cached_partial(train_step, model, optimizer)


def make_eval_step(dtype: Any) -> Callable[[nnx.Module, jax.Array], jax.Array]:
    @nnx.jit
    def eval_step(model: nnx.Module, images: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(forward(model, images, dtype))

    return eval_step


# ---------------------------------------------------------------------------------------------------------------------
# Logs and export metadata
# ---------------------------------------------------------------------------------------------------------------------


def _write_logs(out: Path, history: list[dict[str, Any]], plot: bool) -> None:
    # Rewritten whole from the checkpointed history, so a resumed run never holds lines from lost epochs.
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    if plot and history:
        from flaxtumor.plots import training_curves  # matplotlib only when plotting

        training_curves(history, out / "curves.png")


# ---------------------------------------------------------------------------------------------------------------------
# The run: set-up, phases of epochs (train, then end-of-epoch bookkeeping), export
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """A training phase: `number` as `classifier.set_phase` counts (0: the whole network; 1: the head on a frozen
    backbone; 2: also the last stage; 3: the whole pretrained network), its epochs and peak LR."""

    number: int
    epochs: int
    lr: float


def plan_phases(tcfg: TrainConfig) -> list[Phase]:
    """cls with pretrained weights: phase 1 trains the head on the frozen backbone, phase 2 also the last stage at a
    lower LR, and the optional phase 3 everything at a lower LR still. A random backbone has nothing worth freezing,
    so it trains whole ("phase 0", one phase); so does seg."""
    if tcfg.task != "cls" or tcfg.backbone_weights == "none":
        return [Phase(0, tcfg.epochs, tcfg.lr)]
    phases = [Phase(1, tcfg.epochs, tcfg.lr)]
    if tcfg.phase2_epochs > 0:
        phases.append(Phase(2, tcfg.phase2_epochs, tcfg.lr * tcfg.phase2_lr_factor))
    if tcfg.phase3_epochs > 0:
        phases.append(Phase(3, tcfg.phase3_epochs, tcfg.lr * tcfg.phase3_lr_factor))
    return phases


@dataclass
class Run:
    """What set-up decides once; the phases, epochs and export read it (and move `progress` and `latest`)."""

    cfg: Config
    out: Path
    mesh: Mesh
    batch_size: int
    dtype: Any
    split: Split
    train_slices: list[Slice]
    selection: Selection  # which epoch is exported: the best on validation, or the last (--fold all)
    steps: int  # per epoch
    checkpoints: TrainCheckpoints
    latest: int | None  # the newest checkpoint step
    progress: Progress
    model: nnx.Module
    loss_fn: LossFn
    eval_step: Callable
    phases: list[Phase]
    backbone: dict[str, Any] | None = None  # the backbone weights' metadata (source, patients, ...), when loaded

    @property
    def leader(self) -> bool:
        return jax.process_index() == 0

    @property
    def pretrained(self) -> bool:
        return self.phases[0].number != 0

    def say(self, *args: Any) -> None:
        if self.leader:
            print(*args)

    def train_mode(self, phase: Phase) -> Any:
        """Puts the model in training mode and returns the trainable-parameter filter."""
        if self.cfg.train.task != "cls":
            wrt = nnx.Param
        else:
            wrt = set_phase(self.model, phase.number, self.cfg.model.unfreeze_last_layers)
        self.model.train()  # the classifier keeps its frozen parts in eval mode through this
        return wrt


def _fold_note(cfg: Config) -> str:
    fold = cfg.data.fold
    if fold is None:
        return ""
    if fold == ALL_FOLDS:
        return " (--fold all: every patient trains, none validates; the last epoch is exported)"
    return f" (fold {fold} (0-based) of {cfg.data.folds})"


def _set_up_data(cfg: Config, out: Path, batch_size: int, mesh: Mesh) -> tuple[Split, list[Slice], Selection, int]:
    """The split (the saved one when resuming), the training slices, the selection (with the validation patients)
    and steps per epoch."""
    patients = load_dataset(cfg.data)
    split = choose_split(cfg, patients, out / "split.json")
    train_slices = _slices(select(patients, split.train))
    selection = make_selection(cfg, select(patients, split.val))
    steps = steps_per_epoch(epoch_length(train_slices, cfg.data), batch_size)
    if steps == 0:
        raise DataError(cfg.data.root, f"{len(train_slices)} training slices are too few for batch size {batch_size}")
    # Multi-host: each process loads only its block of rows of every global batch (the pipeline's sharding).
    _, shard_count = sharding.process_shard(mesh, batch_size)
    if jax.process_index() == 0:
        print(
            f"data: {len(split.train)}/{len(split.val)}/{len(split.test)} train/val/test patients"
            + _fold_note(cfg)
            + f", {len(train_slices)} training slices, {steps} steps of {batch_size} per epoch"
            + (f" (tumour sampling, u={cfg.data.sampling_uniform_share:g})" if cfg.data.sampling == "tumour" else "")
            + (f" ({batch_size // shard_count} rows loaded per process)" if shard_count > 1 else "")
        )
    return split, train_slices, selection, steps


def _build_model(cfg: Config, mesh: Mesh, split: Split) -> tuple[nnx.Module, dict[str, Any] | None]:
    """The model, and the loaded backbone weights' metadata (their provenance) when it starts from some."""
    tcfg = cfg.train
    model = build_model(cfg, nnx.Rngs(params=tcfg.seed, dropout=tcfg.seed + 1))
    weights, where = None, tcfg.backbone_weights
    if tcfg.task == "cls" and tcfg.backbone_weights != "none":
        weights = load_backbone(model, tcfg.backbone_weights)
    if tcfg.init_from:  # continue from an exported model of the same architecture (a new run: fresh optimizer)
        source = init_from(model, tcfg.init_from)
        if weights is None:  # the backbone's origin carries over
            weights, where = source.get("backbone_provenance"), f"{tcfg.init_from} (its backbone)"
    # In-domain pretrained weights record their training patients: none may be one this run validates on.
    seen = set((weights or {}).get("patients") or []) & set(split.val + split.test)
    if seen:
        raise ValueError(
            f"{where}: these backbone weights were trained on {len(seen)} of this run's validation/test patients "
            f"(e.g. {sorted(seen)[0]}); pretrain on this split's training patients only"
        )
    nnx.update(model, sharding.replicate(nnx.state(model), mesh))
    return model, weights


def set_up(cfg: Config) -> Run:
    """Sharding, data, checkpoints (refusing to overwrite a run unless resuming) and the model."""
    tcfg = cfg.train
    out = Path(tcfg.out_dir or f"runs/{tcfg.task}")
    leader = jax.process_index() == 0
    mesh = sharding.make_mesh()
    if leader:
        print(sharding.describe(mesh))
    batch_size = sharding.fit_batch_size(tcfg.batch_size, mesh)
    split, train_slices, selection, steps = _set_up_data(cfg, out, batch_size, mesh)

    checkpoints = TrainCheckpoints(out / "orbax", selection.metric)  # its "best" step is the selection's epoch
    latest = checkpoints.latest_step()
    if latest is not None and not tcfg.resume:
        raise RunExists(
            f"{out}: already holds checkpoints (step {latest}); pass --resume to continue or choose another --out"
        )
    progress = Progress(**checkpoints.restore_meta(latest)["progress"]) if latest is not None else Progress()
    if leader:
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_json(out / "config.json")
        save_split(split, out / "split.json")
        if latest is not None:
            print(f"resuming from step {latest}: epoch {progress.data_epoch + 1}, step {progress.step_in_epoch}")
    dtype = compute_dtype(tcfg.precision)
    model, backbone = _build_model(cfg, mesh, split)
    return Run(
        cfg, out, mesh, batch_size, dtype, split, train_slices, selection, steps, checkpoints, latest, progress,
        model, make_loss(tcfg, uses_deep_supervision(cfg)), make_eval_step(dtype), plan_phases(tcfg), backbone,
    )


def train_epoch(run: Run, phase: Phase, optimizer: nnx.Optimizer, train_step: Callable) -> None:
    """The rest of the current epoch (from `progress.step_in_epoch`), with mid-epoch checkpoints."""
    progress, tcfg, steps = run.progress, run.cfg.train, run.steps
    label = f"phase {phase.number} " if run.pretrained else ""
    bar = tqdm(
        total=steps, initial=progress.step_in_epoch, desc=f"{label}epoch {progress.epoch + 1}/{phase.epochs}",
        disable=not run.leader, dynamic_ncols=True,
    )
    pending: tuple[int, dict[str, jax.Array]] | None = None
    since: tuple[float, int] | None = None  # (time, step) of the first settled step: img/s leaves out compiling

    def settle() -> None:
        """Reads the last step's loss (the one host sync per step), one step behind the device."""
        nonlocal pending, since
        if pending is None:
            return
        step, result = pending
        pending = None
        loss = float(result["loss"])
        if not math.isfinite(loss):
            bar.close()
            run.checkpoints.close()
            last = run.checkpoints.latest_step()
            where = run.checkpoints.path(last) if last is not None else "none saved yet"
            raise NonFiniteLoss(
                f"loss is {loss} at step {step} (phase {phase.number}, epoch {progress.epoch + 1}); stopped. "
                f"Last good checkpoint: {where}. Lower --lr and continue with --resume."
            )
        progress.loss_sum += loss
        now = time.perf_counter()
        if since is None:
            since = (now, step)
        rate = (step - since[1]) * run.batch_size / max(now - since[0], 1e-9)
        bar.set_postfix_str(f"loss={loss:.4f} img/s={rate:.1f}" if step > since[1] else f"loss={loss:.4f}")

    shard_index, shard_count = sharding.process_shard(run.mesh, run.batch_size)
    batches = train_batches(
        run.train_slices, run.cfg.data, run.batch_size, tcfg.seed, progress.data_epoch, progress.step_in_epoch,
        shard_index, shard_count,
    )
    step_on = bind_train_step(train_step, run.model, optimizer)
    for batch in batches:
        record_patients(progress, run.split, run.train_slices, batch["index"])
        local = {k: batch[k] for k in ("image", "mask", "label")}
        result = step_on(sharding.shard_batch(local, run.mesh))
        settle()
        progress.step_in_epoch += 1
        progress.global_step += 1
        pending = (progress.global_step, result)
        bar.update(1)
        every = tcfg.save_every_steps
        if every and progress.global_step % every == 0 and progress.step_in_epoch < steps:
            settle()  # never save weights from a step whose loss was not checked
            run.checkpoints.save(progress.global_step, run.model, optimizer, {"progress": progress.to_dict()})
    settle()
    bar.close()


def record_patients(progress: Progress, split: Split, slices: Sequence[Slice], indices: np.ndarray) -> None:
    """The leakage guard: adds the patients of a training batch's rows (`index` into `slices`) to
    `progress.trained_patients`, and stops the run if any is not one of the split's training patients."""
    ids = {slices[i].patient_id for i in indices.tolist()}
    if ids.issubset(progress.trained_patients):
        return
    if leaked := sorted(ids - set(split.train)):
        where = "validation" if set(leaked) & set(split.val) else "test" if set(leaked) & set(split.test) else "no"
        raise TrainingLeak(f"slices of {len(leaked)} patient(s) in the {where} split reached a training batch: "
                           f"{leaked[:3]}; the training data must be the split's training patients only")
    progress.trained_patients = sorted(ids | set(progress.trained_patients))


def _trained_patients(run: Run) -> list[str]:
    """The training patients whose slices reached a batch in any process (each process sees only its rows)."""
    seen = set(run.progress.trained_patients)
    if jax.process_count() == 1:
        return sorted(seen)
    from jax.experimental import multihost_utils

    flags = np.array([pid in seen for pid in run.split.train])
    gathered = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, len(flags))
    return sorted(pid for pid, hit in zip(run.split.train, gathered.any(axis=0)) if hit)


@dataclass(frozen=True)
class EpochEnd:
    """The bookkeeping of one finished epoch (see `end_of_epoch`)."""

    progress: Progress  # history appended; counters at the next epoch, or at the next phase's start when phase_over
    score: float | None  # the selection metric (nan ranked as worst); None when the run does not validate
    improved: bool
    stop: bool  # early stop: `patience` epochs in a row without a better score
    phase_over: bool  # early stop or the phase's last epoch


def end_of_epoch(
    progress: Progress, val: dict[str, float], selection: Selection, phase: Phase, phase_index: int, steps: int,
    seconds: float | None = None,
) -> EpochEnd:
    """Pure: the progress after an epoch of `steps` steps that scored `val` ({} when the run does not validate), as
    `selection` judges it (the input is left as it was). `seconds`: the epoch's wall time in this process (training
    and validation; a resumed epoch counts from the resume), recorded for the compute a recipe costs."""
    judged = selection.judge(val, progress.best, progress.bad_epochs)
    entry = {
        "phase": phase.number, "epoch": progress.epoch + 1, "global_epoch": progress.data_epoch + 1,
        "step": progress.global_step, "train_loss": progress.loss_sum / steps,
        **{f"val_{k}": v for k, v in val.items()},
        **({"seconds": round(seconds, 1)} if seconds is not None else {}),
    }
    after = dataclasses.replace(
        progress,
        history=[*progress.history, entry],
        best=judged.best,
        bad_epochs=judged.bad_epochs,
        epoch=progress.epoch + 1,
        data_epoch=progress.data_epoch + 1,
        step_in_epoch=0,
        loss_sum=0.0,
    )
    phase_over = judged.stop or after.epoch == phase.epochs
    if phase_over:  # the checkpoint records the next phase's start
        after = dataclasses.replace(after, phase_index=phase_index + 1, epoch=0, best=-math.inf, bad_epochs=0)
    return EpochEnd(after, judged.score, judged.improved, judged.stop, phase_over)


def _finish_epoch(run: Run, phase: Phase, index: int, optimizer: nnx.Optimizer, started: float) -> bool:
    """Validates (if the run does), does the bookkeeping, checkpoints and logs; True when the phase is over."""
    tcfg = run.cfg.train
    run.model.eval()
    val = run.selection.validate(run.model, run.eval_step, run.cfg, run.batch_size, run.mesh)
    run.train_mode(phase)
    done = end_of_epoch(run.progress, val, run.selection, phase, index, run.steps, time.perf_counter() - started)
    label = f"phase {phase.number} " if run.pretrained else ""
    entry = done.progress.history[-1]
    run.say(f"{label}epoch {entry['epoch']}/{phase.epochs} {run.selection.epoch_line(entry, done.improved)}")
    run.progress = done.progress
    run.checkpoints.save(
        run.progress.global_step, run.model, optimizer, {"progress": run.progress.to_dict()},
        metrics=run.selection.checkpoint_metrics(entry, done.score),
    )
    run.latest = run.progress.global_step
    if run.leader:
        _write_logs(run.out, run.progress.history, tcfg.plot)
    if done.stop:
        run.say(f"{label}early stop: no better {run.selection.metric} for {tcfg.patience} epochs")
    return done.phase_over


def run_phase(run: Run, index: int, phase: Phase) -> None:
    """A phase's epochs, from where `progress` stands; each phase has its own optimizer and schedule."""
    tcfg = run.cfg.train
    wrt = run.train_mode(phase)
    optimizer = nnx.Optimizer(run.model, make_optimizer(tcfg, phase.lr, phase.epochs * run.steps, run.steps), wrt=wrt)
    nnx.update(optimizer, sharding.replicate(nnx.state(optimizer), run.mesh))
    if run.progress.epoch or run.progress.step_in_epoch:  # resuming inside this phase
        run.checkpoints.restore(run.latest, run.model, optimizer)
    elif index > 0:  # each phase fine-tunes the selection's model so far: the best, or (--fold all) the last
        run.checkpoints.restore(run.checkpoints.best_step(), run.model)
    train_step = make_train_step(run.loss_fn, wrt, run.dtype, uses_deep_supervision(run.cfg))
    if run.pretrained:
        what = {1: "backbone frozen", 2: "last stage unfrozen", 3: "whole backbone unfrozen"}[phase.number]
        run.say(f"phase {phase.number}: {what}, lr {phase.lr:g}")
    while True:
        started = time.perf_counter()
        train_epoch(run, phase, optimizer, train_step)
        if _finish_epoch(run, phase, index, optimizer, started):
            return


def export(run: Run) -> dict[str, Any]:
    """Restores the selection's epoch (the best, or the last), writes the inference checkpoint with its metadata, and
    returns the summary."""
    cfg, tcfg, checkpoints, history = run.cfg, run.cfg.train, run.checkpoints, run.progress.history
    checkpoints.manager.wait_until_finished()
    step = checkpoints.best_step()  # ranked by the selection's metric (see flaxtumor/train/selection.py)
    checkpoints.restore(step, run.model)
    run.model.eval()
    entry = next(h for h in history if h["step"] == step)
    trained = _trained_patients(run)
    metadata = {
        "config": cfg.to_dict(),
        "task": tcfg.task,
        "preprocessing": Preprocessing.from_config(cfg.data).to_dict(),
        # the task's own threshold: a classifier's tumour probability, a segmenter's mask probability
        "threshold": tcfg.cls_threshold if tcfg.task == "cls" else tcfg.mask_threshold,
        "backbone_init": tcfg.backbone_weights if tcfg.task == "cls" else "none",
        # Where the backbone weights came from, as their metadata says (in-domain: the patients they saw).
        **({"backbone_provenance": run.backbone} if run.backbone is not None else {}),
        "init_from": tcfg.init_from,
        "split": run.split.to_dict(),
        "trained_patients": trained,
        **run.selection.record(entry, step, len(trained)),  # "metrics", and "best" (or "exported" for the last epoch)
        "history": history,
        "versions": library_versions(),
    }
    export_dir = Path(tcfg.export_dir or run.out) / EXPORT_NAME[tcfg.task]
    export_inference(export_dir, run.model, metadata, bf16=tcfg.save_bf16)
    checkpoints.close()
    summary = {
        **run.selection.summary(entry, step),
        "checkpoint": str(export_dir),
        "train_checkpoint": str(checkpoints.path(step)),
        "run_dir": str(run.out),
        "history": history,
        "trained_patients": trained,
    }
    label = f"phase {entry['phase']} " if run.pretrained else ""
    run.say(f"{run.selection.describe(entry, step, label)}; inference checkpoint: {export_dir}; run folder: {run.out}")
    return summary


def run(cfg: Config) -> dict[str, Any]:
    """Trains as `cfg` says (resuming exactly where a checkpoint left off) and exports the chosen epoch's model."""
    state = set_up(cfg)
    if state.progress.phase_index >= len(state.phases):
        state.say("this run had already finished (resume does not add epochs); exporting its chosen checkpoint again")
    for index, phase in enumerate(state.phases):
        if index < state.progress.phase_index:
            continue
        if index == state.progress.phase_index and state.progress.epoch >= phase.epochs:
            # Resumed with fewer epochs than it has done (to stop a long run now): the phase is over, and so is an
            # unfinished epoch; the chosen checkpoint so far (best or last epoch end) is what continues or is exported.
            state.say(f"{state.progress.epoch} epochs done ≥ the {phase.epochs} asked for: phase {phase.number} over")
            state.progress = dataclasses.replace(state.progress, phase_index=index + 1, epoch=0, step_in_epoch=0,
                                                 loss_sum=0.0, best=-math.inf, bad_epochs=0)
            continue
        run_phase(state, index, phase)
    return export(state)
