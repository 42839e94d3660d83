"""`python -m flaxtumor.crossval_ensemble --members CV CV [...] --out DIR`: the cross-validation of an ensemble.

The shipped segmenter averages models of one recipe trained with different seeds, so the cross-validation of one
model per fold understates it (two seeds averaged gained +0.009 on folds 0 and 4). Here each patient is predicted by
the average of the members' fold models that held it out: fold k of every member cross-validation (the same folds
from the same split seed), their probabilities and flip-TTA probabilities averaged in float32 as
`flaxtumor.ensemble` averages them, then stored and scored in float16 like one model's. Scoring is `crossval`'s own
(`crossval.write_report`): OUT/oof/, OUT/crossval.json (with `members`) and OUT/pipeline.json, the post-processing
chosen on these predictions.

A member is a cross-validation folder: a config.json and fold_<k>/ folders, as `crossval --out` writes them or as
`train.py --config CV/config.json --fold k --seed S --out CV/fold_k` fills them one fold at a time. With `--preview`
only the folds every member has finished are scored, into OUT/crossval_preview.json, and nothing else is written.

    python -m flaxtumor.crossval_ensemble --members runs/cv_fixed runs/cv_fixed_seed1 --out runs/cv_fixed_2seeds
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flaxtumor import crossval as CV
from flaxtumor import oof
from flaxtumor.config import Config


def average_oof(predictions: Sequence[Sequence[oof.OutOfFold]]) -> list[oof.OutOfFold]:
    """Each patient's probabilities averaged over several models' predictions (lists in the same patient order), in
    float32, as an ensemble averages its members (`flaxtumor.ensemble`); the flip-TTA volumes too when every model
    has them. The models must have seen each patient through the same crop."""
    out = []
    for same_patient in zip(*predictions):
        first = same_patient[0]
        if len({r.patient_id for r in same_patient}) != 1 or len({r.box for r in same_patient}) != 1:
            raise ValueError(f"{first.patient_id}: the predictions to average differ in patient or crop box")
        mean = lambda volumes: np.mean([v.astype(np.float32) for v in volumes], axis=0)  # noqa: E731
        flipped = [r.flipped for r in same_patient]
        out.append(replace(first, probabilities=mean([r.probabilities for r in same_patient]),
                           flipped=None if any(f is None for f in flipped) else mean(flipped)))
    return out


def member_configs(members: Sequence[Path]) -> list[Config]:
    """Each member's config.json; an error naming the member when one is missing or its folds differ from the
    first's (another fold count or split seed holds out other patients)."""
    configs = []
    for m in members:
        if not (Path(m) / "config.json").is_file():
            raise ValueError(f"{m}: not a cross-validation folder (no config.json)")
        configs.append(Config.from_json(Path(m) / "config.json"))
    first = configs[0]
    for m, c in zip(members, configs):
        if c.train.task != "seg":
            raise ValueError(f"{m}: a {c.train.task} cross-validation; only segmenters are averaged")
        if (c.data.folds, c.data.split_seed) != (first.data.folds, first.data.split_seed):
            raise ValueError(f"{m}: {c.data.folds} folds from split seed {c.data.split_seed}, {members[0]}: "
                             f"{first.data.folds} from {first.data.split_seed}; members must share their folds")
    return configs


def shared_held_out(members: Sequence[Path], folds: int | Sequence[int], patients: Sequence[Any]) -> dict[str, int]:
    """patient_id -> fold, the same in every member (read from each fold's split.json); an error naming the member
    whose fold holds out other patients."""
    fold_of = CV.held_out(members[0], folds, patients)
    for m in members[1:]:
        other = CV.held_out(m, folds, patients)
        if moved := sorted(pid for pid in fold_of.keys() | other.keys() if fold_of.get(pid) != other.get(pid)):
            raise ValueError(f"{m}: its folds hold out other patients than {members[0]}'s (e.g. {moved[0]})")
    return fold_of


def predict_fold(fold: int, members: Sequence[Path], patients: Sequence[Any]) -> tuple[list[oof.OutOfFold], Any]:
    """The members' fold-`fold` models' averaged predictions of `patients` (with flip TTA), and the first model's
    metadata; an error naming the model that trained on one of them, reads its input another way or thresholds
    elsewhere."""
    from flaxtumor.checkpoint_metadata import read_metadata
    from flaxtumor.ensemble import mismatch

    paths = [CV.export_path(m, fold, "seg") for m in members]
    metas = [read_metadata(path) for path in paths]
    held = {p.patient_id for p in patients}
    for path, meta in zip(paths, metas):  # checked before any model runs
        if seen := sorted(set(meta.get("trained_patients") or []) & held):
            raise ValueError(f"{path}: trained on {len(seen)} of fold {fold}'s held-out patients (e.g. {seen[0]})")
        why = mismatch(meta, metas[0], f"{members[0]}'s fold {fold}") or (
            meta.threshold != metas[0].threshold and f"threshold {meta.threshold} differs from {metas[0].threshold}")
        if why:
            raise ValueError(f"{path / 'metadata.json'}: {why}")
    predictions = [oof.predict_fold(fold, path, patients, tta=True)[0] for path in paths]
    # stored and scored in float16, like one model's out-of-fold volumes
    half = lambda v: None if v is None else v.astype(np.float16)  # noqa: E731
    return [replace(r, probabilities=half(r.probabilities), flipped=half(r.flipped))
            for r in average_oof(predictions)], metas[0]


def out_of_fold(members: Sequence[Path], out: Path, data: str | None = None, preview: bool = False,
                say=print) -> dict[str, Any]:
    """Scores the ensemble out of fold (all folds, or with `preview` those every member finished) and writes its
    report as `crossval` writes one."""
    from flaxtumor.data.lgg import load_dataset

    members = [Path(m) for m in members]
    configs = member_configs(members)
    base = configs[0]
    base = base.override(**{"train.out_dir": str(out), **({"data.root": data} if data else {})})
    patients = {p.patient_id: p for p in load_dataset(base.data)}
    done = {m: set(CV.finished_folds(m, base.data.folds, "seg")) for m in members}
    folds = sorted(set.intersection(*done.values())) if preview else list(range(base.data.folds))
    if not folds:
        raise ValueError("no fold is finished in every member, so there is nothing to preview")
    if not preview and (missing := [(str(m), k) for m in members for k in folds if k not in done[m]]):
        raise ValueError(f"{missing[0][0]}: fold {missing[0][1]} has no exported model yet (--preview scores the "
                         "finished folds)")
    fold_of = shared_held_out(members, folds if preview else base.data.folds, list(patients.values()))
    results, threshold = [], None
    Path(out).mkdir(parents=True, exist_ok=True)
    for fold in folds:
        mine = [patients[pid] for pid in sorted(fold_of) if fold_of[pid] == fold]
        fold_results, metadata = predict_fold(fold, members, mine)
        threshold = metadata.threshold
        if not preview:
            (Path(out) / CV.OOF_DIR).mkdir(exist_ok=True)
            for r in fold_results:
                oof.save_oof(r, Path(out) / CV.OOF_DIR)
        results += fold_results
        say(f"fold {fold}: {len(mine)} held-out patients predicted by {len(members)} models, averaged")
    by = f"the average of the {len(members)} members' fold models that did not train on it"
    return CV.write_report(base, Path(out), results, patients, fold_of, threshold, folds, preview,
                           epochs_from=members[0], predicted_by=by,
                           extra={"members": [str(m) for m in members],
                                  "member_seeds": [c.train.seed for c in configs]})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flaxtumor.crossval_ensemble", description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=Path, nargs="+", required=True, help="cross-validation folders to average")
    ap.add_argument("--out", type=Path, required=True, help="where the ensemble's cross-validation is written")
    ap.add_argument("--data", default=None, help="kaggle_3m folder (default: the first member's data root)")
    ap.add_argument("--preview", action="store_true",
                    help=f"score only the folds every member has finished, into OUT/{CV.PREVIEW_FILE}")
    args = ap.parse_args(argv)
    if len(args.members) < 2:
        ap.error("--members: an ensemble needs at least two cross-validations")
    from flaxtumor.checkpoint_metadata import CheckpointError
    from flaxtumor.data.io import DataError
    from flaxtumor.runtime import enable_compilation_cache

    enable_compilation_cache()
    try:
        report = out_of_fold(args.members, args.out, args.data, args.preview)
    except (CheckpointError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(CV.headline(report) + f"; details: {args.out / (CV.PREVIEW_FILE if args.preview else CV.CV_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
