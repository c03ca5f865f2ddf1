"""The study's vocabulary, declared once: datasets, bias ratios, severities, splits, budgets, methods.

Every `Literal` param type, command-line choice and table axis is derived from these tuples; the
method names are the keys of `biasdd.distill.METHODS` (checked there at import). docs/protocol.md §1
defines the terms.
"""

from __future__ import annotations

from typing import Literal

NUM_CLASSES = 10  # K: classes, and attributes (attribute k is class k's bias-aligned one)

DATASETS = ("cmnist", "ccifar10")
DATASET_TITLES = {"cmnist": "CMNIST-DD", "ccifar10": "CCIFAR10-DD"}
Dataset = Literal[DATASETS]  # type: ignore[valid-type]

BIAS_RATIOS = (0.0, 0.1, 0.5, 0.8, 0.95, 1.0)  # the study's Table 1 grid (docs/protocol.md §8)
SEVERITIES = (1, 2, 3, 4)
TABLE1_SEVERITY = 4  # Table 1's severity; Table 2 sweeps SEVERITIES for DM at SWEEP_RATIOS
SWEEP_RATIOS = (0.0, 1.0)

TRAIN = "train"
TEST_SPLITS = ("test_conflicting", "test_uniform")
SPLITS = (TRAIN, *TEST_SPLITS)
SPLIT_RATIO = {"test_conflicting": 0.0, "test_uniform": 0.1}  # rho of each test split (§2)
SPLIT_TITLES = {
    "test_conflicting": "unbiased test set (rho = 0, the study's number)",
    "test_uniform": "uniform test set (rho = 0.1)",
}

BUDGETS = ("quick", "hour", "paper")
Budget = Literal[BUDGETS]  # type: ignore[valid-type]
BUDGET_NOTES = {
    "quick": "REDUCED budget, not the study's numbers",
    "hour": "REDUCED budget (an hour on a CPU), not the study's numbers",
    "paper": "the study's budget (docs/protocol.md)",
}

METHOD_TITLES = {"dc": "DC", "dsa": "DSA", "dm": "DM", "mtt": "MTT"}  # the keys of biasdd.distill.METHODS
METHODS = tuple(METHOD_TITLES)
STUDY_METHODS = ("dc", "dsa", "dm")  # the study's methods, whose findings (§8) are checked
# debias.mode (docs/protocol.md §9): labelled modes use the attribute labels, the `inferred` ones the
# bias model; `none` is the study's plain methods
DEBIAS_MODES = ("none", "groups", "fairdd", "inferred", "inferred_groups", "inferred_fairdd")
LABEL_FREE_MODES = ("inferred", "inferred_groups", "inferred_fairdd")
SYNCHRONIZED_MODES = ("fairdd", "inferred_fairdd")  # FairDD's synchronized matching over the groups
DEBIAS_TITLES = {
    "none": "none",
    "groups": "groups (labels)",
    "fairdd": "FairDD (labels)",
    "inferred": "inferred: JTT weights (no labels)",
    "inferred_groups": "inferred groups (no labels)",
    "inferred_fairdd": "inferred FairDD (no labels)",
}
# Methods whose distillation reads expert trajectories (the registry's `Method.needs_experts`, checked by
# tests/test_distill.py): declared here so that the experts stage need not import the distillation code,
# whose every edit would then retrain the experts.
EXPERT_METHODS = ("mtt",)
LEARNED_LR = "learned_lr"  # a synthetic set's learned learning rate (MTT), per repeat, read by evaluation
FULL = "full"  # the "Full set" row: networks trained on the whole biased training set
ROW_TITLES = {**METHOD_TITLES, FULL: "Full set"}
