"""A tiny config for end-to-end tests: real embedded MNIST cut to a few hundred images, narrow nets,
a handful of iterations and epochs. Applied through the quick budget's overlay."""

from __future__ import annotations

from typing import Any

TINY_SCHEDULE = {"epochs": 4, "lr_milestones": [2]}


def make_tiny(params: dict[str, Any]) -> None:
    params["budget"] = "quick"
    params["device"] = "cpu"
    params["download"]["limit_train"] = 300
    params["download"]["limit_test"] = 100
    params["plot"]["grid_ipc"] = 2
    params["budgets"]["quick"] = {
        "model": {"width": 8},
        "distill": {
            "repeats": 2,
            "checkpoint_every": 1,
            "dc": {
                "ipc": 2,
                "iterations": 2,
                "outer_loop": 2,
                "inner_loop": 1,
                "batch_real": 8,
                "batch_train": 16,
            },
            "dsa": {
                "ipc": 2,
                "iterations": 2,
                "outer_loop": 2,
                "inner_loop": 1,
                "batch_real": 8,
                "batch_train": 16,
            },
            "dm": {"ipc": 2, "iterations": 4, "batch_real": 8},
        },
        "evaluate": {
            "repeats": 2,
            "synthetic": {
                "schedule": {
                    dataset: {m: dict(TINY_SCHEDULE) for m in ("dc", "dsa", "dm")}
                    for dataset in ("cmnist", "ccifar10")
                }
            },
            "full": {"epochs": 2, "lr_milestones": [1], "limit_train": 200},
        },
        "bias_model": {"steps": 5, "batch_size": 16, "width": 4},
        "bias_classifier": {"steps": 5, "batch_size": 16, "width": 4, "reference_limit": 100},
    }
