"""Where a label-free cell loses to a labelled one: the gap between two runs' accuracy, (class, attribute)
group by group, split into the groups the label-free run's bias model missed, the conflicting groups it
found and the aligned groups (docs/protocol.md §9).

    python benchmarks/group_gap_probe.py --method dc --pair 1288c94 9061afd --pair c8f8acf a830ec4
    # each --pair: the labelled run (e.g. debias.mode=fairdd), then the label-free one (an inferred
    # mode); a run is any git revision holding its dvc.lock: a DVC experiment's commit (`biasdd-report`'s
    # cells.csv names them in its `source` column), a branch, HEAD

For each run the script reads its params.yaml and dvc.lock at that revision, takes the biased set, the
method's synthetic set and the bias model's output from the local DVC cache (by their md5; `dvc pull` them
first where a remote holds them), trains the evaluation networks again exactly as the evaluate stage did
(`biasdd.pipeline.evaluate.train_evaluation_networks`), and checks the accuracy it gets against the run's
committed metric: a run whose networks do not come out the same (another machine, other code) is
reported, not used. Then, on `--split` (default test_uniform), per pair: the gap between the two
accuracies, split into the parts from the groups the label-free run's bias model missed (true (class,
attribute) groups of bias-conflicting training samples that no pseudo-attribute names), from the other
conflicting groups and from the aligned ones, with both runs' accuracy on the missed groups. Cost: one
evaluation per run (DC at the quick budget on 2 CPU cores: 54 s for one pair alone, 23 min for ten runs
while a DVC queue shared the cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import tempfile
from pathlib import Path

import torch
import yaml

from biasdd import artifacts
from biasdd.params import load_params
from biasdd.pipeline import evaluate
from biasdd.training.runtime import start
from biasdd.vocab import NUM_CLASSES

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".dvc" / "cache" / "files" / "md5"


def git_show(rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout


def cached(lock: dict, path: str, required: bool = True) -> Path | None:
    """The DVC cache file of the output `path` in a dvc.lock; None where the lock has no such output and
    it is not `required`."""
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                md5 = out["md5"]
                file = CACHE / md5[:2] / md5[2:]
                if not file.exists():
                    raise SystemExit(f"{path} ({md5}) is not in the local DVC cache; `dvc pull` it first")
                return file
    if required:
        raise SystemExit(f"dvc.lock has no output {path}")
    return None


def group_accuracy(
    rev: str, method: str, split: str, workdir: Path
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(K * K,) mean correct predictions over the networks and (K * K,) samples, per (class, attribute)
    group of `split`, for the run at `rev`, and the paths of its biased set and bias-model output."""
    lock = yaml.safe_load(git_show(rev, "dvc.lock"))
    params_path = workdir / f"{rev}.yaml"
    params_path.write_text(git_show(rev, "params.yaml"))
    files = {
        "biased": cached(lock, "data/biased.h5"),
        "synthetic": cached(lock, f"data/synthetic/{method}.h5"),
        "bias_model": cached(lock, "data/bias_model.h5", required=False),  # None before that stage
    }
    setup = evaluate.configure(load_params(params_path), method)
    setup = dataclasses.replace(setup, run=start(setup.run))
    trained = evaluate.train_evaluation_networks(setup, files["biased"], files["synthetic"], progress=False)
    images, labels, attributes = evaluate.load_test_splits(files["biased"])[split]
    pred = trained.ensemble.predict(images, batch_size=setup.shared.batch_test, compute=setup.run.compute)
    hits = torch.zeros(NUM_CLASSES**2, dtype=torch.float64)
    for p in pred:  # (R, N): one row per network
        counts, h = evaluate.group_hits((p.cpu() == labels).double(), labels, attributes, NUM_CLASSES)
        hits += h
    hits /= pred.shape[0]
    accuracy = float(hits.sum() / counts.sum())
    committed = json.loads(git_show(rev, f"metrics/{split}/{method}.json"))["acc"]
    same = abs(accuracy - committed) < 5e-5
    print(f"{rev}: {split} {100 * accuracy:.2f}, committed {100 * committed:.2f}: "
          f"{'the same networks' if same else 'NOT the same networks; this run is left out'}")  # fmt: skip
    if not same:
        raise LookupError(rev)
    return hits, counts, files


def missed_groups(files: dict) -> torch.Tensor:
    """(K * K,) bool: the true bias-conflicting (class, attribute) groups of the training split that no
    pseudo-attribute of the bias model names."""
    if files["bias_model"] is None:
        raise SystemExit(
            "the label-free run's dvc.lock has no data/bias_model.h5: give an inferred mode's run"
        )
    train = artifacts.read_h5(files["biased"], "train", ("labels", "attributes"), kind="biased")
    labels = torch.from_numpy(train["labels"].astype("int64"))
    attributes = torch.from_numpy(train["attributes"].astype("int64"))
    pseudo = artifacts.read_h5(files["bias_model"], "train", ("pseudo_attributes",), kind="bias_model")
    pseudo = torch.from_numpy(pseudo["pseudo_attributes"].astype("int64"))
    true = torch.zeros(NUM_CLASSES**2, dtype=torch.bool)
    found = torch.zeros(NUM_CLASSES**2, dtype=torch.bool)
    true[(labels * NUM_CLASSES + attributes)[attributes != labels]] = True
    found[(labels * NUM_CLASSES + pseudo)[pseudo != labels]] = True
    return true & ~found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=["dc", "dsa", "dm", "mtt"])
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("LABELLED", "LABEL_FREE"))
    parser.add_argument("--split", default="test_uniform", choices=["test_uniform", "test_conflicting"])
    args = parser.parse_args()
    group = torch.arange(NUM_CLASSES**2)
    aligned = group // NUM_CLASSES == group % NUM_CLASSES  # (K * K,) the groups whose attribute is the class
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for labelled, label_free in args.pair:
            try:
                hits_a, counts, _ = group_accuracy(labelled, args.method, args.split, Path(tmp))
                hits_b, counts_b, files = group_accuracy(label_free, args.method, args.split, Path(tmp))
            except LookupError:
                continue
            if not torch.equal(counts, counts_b):
                print(f"{labelled}, {label_free}: other test sets (another seed?); pair left out")
                continue
            missed = missed_groups(files)
            points = 100 * (hits_a - hits_b) / float(counts.sum())  # each group's part of the gap
            found = ~missed & ~aligned
            parts = [float(points[m].sum()) for m in (torch.ones_like(missed), missed, found, aligned)]
            on_missed = None
            if bool(missed.any()):
                on_missed = [100 * float(h[missed].sum() / counts[missed].sum()) for h in (hits_a, hits_b)]
            names = ", ".join(f"class {int(g) // NUM_CLASSES} in attribute {int(g) % NUM_CLASSES}"
                              for g in torch.nonzero(missed).squeeze(1))  # fmt: skip
            rows.append((labelled, label_free, parts, on_missed, names))
    print(
        f"\n{args.method}, {args.split}: the labelled run's accuracy minus the label-free one's, in points, "
        "and its parts from the groups the bias model missed, the conflicting groups it found (or that hold "
        "no training sample) and the aligned groups; the missed groups' accuracy in both runs"
    )
    print("| labelled | label-free | gap | missed | found | aligned | missed groups | on them |")
    print("|---|---|---|---|---|---|---|---|")
    for labelled, label_free, parts, on_missed, names in rows:
        acc = "-" if on_missed is None else f"{on_missed[0]:.1f} / {on_missed[1]:.1f}"
        gaps = " | ".join(f"{p:.2f}" for p in parts)
        print(f"| {labelled} | {label_free} | {gaps} | {names or 'none'} | {acc} |")


if __name__ == "__main__":
    main()
