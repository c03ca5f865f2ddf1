"""Distillation methods behind one registry; each is a function over tensors with one signature:

    distill(real_images, real_labels, num_classes, cfg, net_factory, generator,
            dsa=None, resume=None, on_checkpoint=None, checkpoint_every=0, progress=True,
            debias=None) -> DistillResult

`debias` (a `DebiasTargets`, built by `biasdd.debias.debias_targets`) reweights the real-side target and
adds the bounded repulsion from the bias-aligned samples (issue 6); None is the plain method.

`METHODS[key]` is the function, `CONFIGS[key]` its frozen config class (built from the params section
`distill.<key>` with `biasdd.config.from_dict`). The keys are those of params.yaml and dvc.yaml.
"""

from __future__ import annotations

from biasdd.distill import dc, dm, dsa
from biasdd.distill.common import DebiasTargets, DistillResult

METHODS = {"dc": dc.distill, "dsa": dsa.distill, "dm": dm.distill}
CONFIGS = {"dc": dc.DCConfig, "dsa": dsa.DSAMethodConfig, "dm": dm.DMConfig}

__all__ = ["CONFIGS", "METHODS", "DebiasTargets", "DistillResult"]
