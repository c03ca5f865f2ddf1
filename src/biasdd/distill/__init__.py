"""Distillation methods behind one registry; a method is one file and one entry here.

`METHODS[key]` is a `driver.Method`: its config class (params section `distill.<key>`, `config`), the
matcher that supplies what the method adds to the shared loop (`driver.distill`), whether it uses DSA,
and for MTT that it draws no real batches and reads expert trajectories (`upstream=`). Calling it
distils:

    result = METHODS["dm"](real_images, real_labels, num_classes, cfg, net_factory, generator, dsa=dsa)

The keys are those of params.yaml, dvc.yaml (`distill@dm`), file names and metrics.
"""

from __future__ import annotations

from biasdd.distill import dc, dm, dsa, mtt
from biasdd.distill.driver import DistillConfig, DistillResult, Method
from biasdd.distill.sampling import DebiasTargets

METHODS: dict[str, Method] = {
    "dc": Method("dc", dc.DCConfig, dc.GradientMatching, uses_dsa=False),
    "dsa": Method("dsa", dsa.DSAMethodConfig, dsa.matcher, uses_dsa=True),
    "dm": Method("dm", dm.DMConfig, dm.DistributionMatching, uses_dsa=True),
    "mtt": Method(
        "mtt",
        mtt.MTTConfig,
        mtt.TrajectoryMatching,
        uses_dsa=True,  # per sample in the student's steps (the driver's siamese DSA needs real batches)
        draws_real=False,
        needs_experts=True,
        loss_per_class=False,  # one normalised distance, logged as the reference logs it
    ),
}

__all__ = ["METHODS", "DebiasTargets", "DistillConfig", "DistillResult", "Method"]
