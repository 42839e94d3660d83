"""Segmenter ensembles, their probabilities averaged (nnU-Net's default): the k cross-validation fold models, or
models of one recipe trained on every patient with different seeds, shipped as one segmenter.

An ensemble checkpoint is a folder with
- `metadata.json`: an `InferenceMetadata` like any checkpoint's (config, preprocessing, threshold), whose `ensemble`
  key names the member folders; its `split` has `train` only (every patient trained at least one member, so none is
  held out from the ensemble) and `trained_patients` is their union;
- one ordinary inference checkpoint per member (`fold_0/` ... `fold_<k-1>/`, or `member_0/` ...), each with its own
  metadata, history and held-out patients (none for an all-patient model).

Serving loads it wherever it loads a segmenter (`Pipeline.from_checkpoints`, hence predict, evaluate and the app):
each member is a `CompiledModel` with its own serving-cache entry, and `EnsembleModel` averages their sigmoid outputs
(after each member's flip TTA, when on) before the mask threshold.

    python -m flaxtumor.ensemble --cv runs/cv --out runs/cv/ensemble --bf16

builds one from a finished cross-validation (`python -m flaxtumor.crossval`): the exact fold models the
cross-validation scored out of fold, stored in bfloat16 with `--bf16` (restored to float32 for serving).

    python -m flaxtumor.ensemble --members runs/cv/fold_all runs/seed1_all --crossval runs/cv/crossval.json --out DIR

builds one from any segmenters that read their input alike, e.g. all-patient models of the cross-validated recipe
trained with different seeds (members `member_0`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from flaxtumor.checkpoint_metadata import CheckpointError, InferenceMetadata, read_metadata, segmenter_export
from flaxtumor.compiled_model import CompiledModel

ENSEMBLE_KEY = "ensemble"
COMBINE = "mean of the members' tumour probabilities (each after its own flip TTA when on), then the mask threshold"


def member_paths(path: Path, metadata: InferenceMetadata) -> list[Path]:
    """The member folders an ensemble checkpoint names ([] for a single model). CheckpointError (naming the
    metadata file) for a malformed list or a member folder that is missing."""
    spec = metadata.extra.get(ENSEMBLE_KEY)
    if spec is None:
        return []
    where = Path(path) / "metadata.json"
    names = spec.get("members") if isinstance(spec, dict) else None
    if not names or not all(isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") for n in names):
        raise CheckpointError(f"{where}: '{ENSEMBLE_KEY}.members' must be a non-empty list of sub-folder names, "
                              f"got {names!r}")
    missing = [n for n in names if not (Path(path) / n).is_dir()]
    if missing:
        raise CheckpointError(f"{where}: ensemble member folder(s) missing: {', '.join(missing)}")
    return [Path(path) / n for n in names]


def check_members(path: Path, metadata: InferenceMetadata, members: Sequence[InferenceMetadata]) -> None:
    """Every member must read its input the way the ensemble's metadata says, and do the same task; otherwise their
    probabilities cannot be averaged (CheckpointError naming the member)."""
    for member_path, member in zip(member_paths(path, metadata), members):
        if why := mismatch(member, metadata, "the ensemble's"):
            raise CheckpointError(f"{member_path / 'metadata.json'}: {why} ({path / 'metadata.json'})")


def mismatch(member: InferenceMetadata, reference: InferenceMetadata, whose: str) -> str | None:
    """Why `member` cannot be averaged with `reference` (another task, or input read another way), else None."""
    for field in ("task", "preprocessing"):
        if getattr(member, field) != getattr(reference, field):
            return f"{field} {getattr(member, field)!r} differs from {whose} {getattr(reference, field)!r}"
    return None


class EnsembleModel:
    """The members' probabilities averaged; called like a `CompiledModel` (prepare, compile, __call__)."""

    def __init__(self, members: Sequence[CompiledModel]):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        first = self.members[0]
        self.batch_size, self.image_size, self.channels = first.batch_size, first.image_size, first.channels

    def prepare(self, tta: bool) -> bool:
        """Prepares every member (a bad member fails here); True when the cache had all of them."""
        return all([m.prepare(tta) for m in self.members])  # a list: every member prepares, not just up to a miss

    def compile(self, tta: bool) -> None:
        for m in self.members:
            m.compile(tta)

    def __call__(self, x: np.ndarray, tta: bool) -> np.ndarray:
        total = self.members[0](x, tta).astype(np.float32)
        for m in self.members[1:]:
            total += m(x, tta)
        return total / len(self.members)


# -- building one (a command, not serving) ----------------------------------------------------------------------
def describe(members: Sequence[InferenceMetadata], from_cv: bool) -> str:
    """What the members are, for the model card: "5 fold models", or "2 all-patient models (seeds 0, 1)"."""
    if from_cv:
        return f"{len(members)} fold models"
    seeds = ", ".join(str(m.config.train.seed) for m in members)
    everyone = all(not (m.split or {}).get("val") for m in members)
    return f"{len(members)} {'all-patient ' if everyone else ''}models (seeds {seeds})"


def ensemble_metadata(members: Sequence[InferenceMetadata], names: Sequence[str], source: str,
                      crossval: dict | None, from_cv: bool = True) -> InferenceMetadata:
    """The ensemble's own metadata: the members' recipe and preprocessing, every patient any member trained on, and
    each member's held-out patients; `metrics` holds the cross-validation's out-of-fold headline when given."""
    first = members[0]
    trained = sorted({p for m in members for p in (m.extra.get("trained_patients") or (m.split or {}).get("train")
                                                    or [])})
    held_out = {name: list((m.split or {}).get("val") or []) for name, m in zip(names, members)}
    # A seed ensemble's own cross-validation (crossval_ensemble) averages each fold's models as this segmenter does.
    per_fold = (f"each fold's {len(crossval['members'])} models (one per seed) averaged, as here"
                if crossval is not None and "members" in crossval else "one model per fold")
    scored = ("The cross-validation scored each member on its own held-out patients (crossval)." if from_cv else
              f"Its members' out-of-sample estimate is the cross-validation of their recipe (crossval), made with "
              f"{per_fold}.")
    metrics: dict = {"protocol": "an ensemble has no held-out patients: every patient trained at least one member. "
                                 + scored}
    if crossval is not None:
        v = crossval.get("postprocessing", {}).get("volumetric_dice") or crossval.get("volumetric_dice") or {}
        metrics["crossval"] = {k: v[k] for k in ("mean", "mean_ci95", "median", "worst") if k in v}
    extra = {k: val for k, val in first.extra.items() if k not in ("history", "best", "trained_patients")}
    extra.update({
        "trained_patients": trained,
        ENSEMBLE_KEY: {"members": list(names), "describe": describe(members, from_cv), "combine": COMBINE,
                       "source": source, "held_out": held_out,
                       "best": {name: m.extra.get("best") for name, m in zip(names, members)}},
    })
    config = first.config.override(**{"data.fold": None})
    return dataclasses.replace(first, config=config, split={"seed": (first.split or {}).get("seed"), "train": trained},
                               metrics=metrics, extra=extra)


def _write(out: Path, members: dict[str, Path], source: str, crossval: dict | None, from_cv: bool,
           bf16: bool) -> Path:
    """Writes the ensemble of the `members` (name -> inference checkpoint) to `out`, atomically: a temporary folder,
    checked as serving will read it, then a rename."""
    from flaxtumor.checkpoints import export_inference, load_inference

    out = Path(out).absolute()
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = {name: load_inference(checkpoint) for name, checkpoint in members.items()}
    metas = [meta for _, meta in loaded.values()]
    first, *others = members.values()
    for path, meta in zip(others, metas[1:]):  # named by their source, before anything is written
        if why := mismatch(meta, metas[0], f"{first / 'metadata.json'}'s"):
            raise CheckpointError(f"{path / 'metadata.json'}: {why}; an ensemble averages probabilities pixel by "
                                  "pixel, so its members must read their input alike")
    try:
        for name, (model, meta) in loaded.items():
            export_inference(tmp / name, model, meta, bf16=bf16)
        meta = ensemble_metadata(metas, list(members), source, crossval, from_cv)
        meta = dataclasses.replace(meta, dtype="bfloat16" if bf16 else "float32")
        (tmp / "metadata.json").write_text(json.dumps(meta.to_dict(), indent=2) + "\n")
        written = read_metadata(tmp)  # what serving will read: checked before it replaces anything
        check_members(tmp, written, [read_metadata(p) for p in member_paths(tmp, written)])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def build(cv: Path, out: Path, task: str = "seg", bf16: bool = False) -> Path:
    """The ensemble of a finished cross-validation's fold models, written to `out`."""
    from flaxtumor.crossval import CV_FILE, export_path, finished_folds

    cv = Path(cv)
    folds = json.loads((cv / "config.json").read_text())["data"]["folds"]
    done = finished_folds(cv, folds, task)
    if len(done) != folds:
        raise ValueError(f"{cv}: only folds {done} of {folds} are finished; finish the cross-validation first "
                         f"(python -m flaxtumor.crossval --out {cv} --resume)")
    crossval = json.loads((cv / CV_FILE).read_text()) if (cv / CV_FILE).is_file() else None
    members = {f"fold_{k}": export_path(cv, k, task) for k in range(folds)}
    return _write(out, members, str(cv), crossval, from_cv=True, bf16=bf16)


def build_from_members(paths: Sequence[Path], out: Path, crossval: Path | None = None, bf16: bool = False) -> Path:
    """The ensemble of any segmenters that read their input alike (e.g. all-patient models of one recipe with
    different seeds), written to `out` with members `member_0`, ...; a training folder stands for its `segmenter/`
    export. `crossval`: the recipe's cross-validation report (crossval.json), quoted as the estimate."""
    if len(paths) < 2:
        raise ValueError("an ensemble needs at least two members")
    exports = [segmenter_export(p) for p in paths]
    for e in exports:
        if not (e / "metadata.json").is_file():
            raise ValueError(f"{e}: not a segmenter checkpoint (no metadata.json)")
    report = json.loads(Path(crossval).read_text()) if crossval is not None else None
    members = {f"member_{k}": e for k, e in enumerate(exports)}
    return _write(out, members, ", ".join(str(p) for p in paths), report, from_cv=False, bf16=bf16)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flaxtumor.ensemble",
                                 description="Ship segmenters as one ensemble (probabilities averaged): a finished "
                                             "cross-validation's fold models (--cv), or any models that read their "
                                             "input alike (--members), e.g. all-patient runs with different seeds.")
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--cv", type=Path, default=None, help="the cross-validation folder (default runs/cv)")
    source.add_argument("--members", type=Path, nargs="+", metavar="DIR",
                        help="training folders or segmenter exports, two or more")
    ap.add_argument("--crossval", type=Path, default=None, metavar="FILE",
                    help="--members: their recipe's cross-validation report (crossval.json), quoted as the estimate")
    ap.add_argument("--out", type=Path, required=True, help="the ensemble checkpoint folder to write")
    ap.add_argument("--bf16", action="store_true", help="store the members' weights in bfloat16 (half the size)")
    args = ap.parse_args(argv)
    if args.crossval is not None and not args.members:
        ap.error("--crossval goes with --members (a --cv ensemble quotes its own cross-validation)")
    cv = args.cv or Path("runs/cv")
    if not args.members and not (cv / "config.json").is_file():
        ap.error(f"--cv {cv}: no cross-validation there (no config.json)")
    try:
        out = (build_from_members(args.members, args.out, args.crossval, bf16=args.bf16) if args.members
               else build(cv, args.out, bf16=args.bf16))
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = read_metadata(out)
    print(f"wrote {out}: {len(member_paths(out, meta))} members ({meta.extra[ENSEMBLE_KEY]['describe']}), "
          f"{meta.dtype}, trained on {len(meta.extra['trained_patients'])} patients")
    return 0


if __name__ == "__main__":
    sys.exit(main())
