"""One DM cell of the study on a GPU: real CMNIST-DD at bias ratio 0.95, severity 4, the paper's IPC 50,
ConvNet-3 width 128 and batch_real 256, for as many DM iterations as fit in `--seconds` (the paper runs
20,000), then the paper's evaluation (3 networks, 1000 epochs, DSA). Writes its figures as JSON.

    PYTHONPATH=src python benchmarks/gpu_dm_cell.py --data data/biased.h5 --seconds 150 --out dm_cell.json

`--data` must be CMNIST-DD at bias ratio 0.95 (stages/download.py, then stages/bias_inject.py). Needs no
DVC: it reads the paper values from conf/config.yaml. Cost: `--seconds` plus about a minute.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from biasdd import artifacts
from biasdd.pipeline import distill as distill_stage
from biasdd.pipeline import evaluate


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=150.0, help="time for the distillation")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/biasdd_gpu_dm"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script on a CPU")
    args = parser.parse_args()
    params = yaml.safe_load(Path("conf/config.yaml").read_text())  # the paper values
    params.pop("defaults", None)
    params.update(device=args.device, bias_ratio=0.95, severity=4, budget="paper")
    params["distill"]["repeats"] = 1
    if args.smoke:  # REDUCED: only checks that the script runs
        params["model"]["width"] = 8
        params["distill"]["dm"].update(ipc=2, batch_real=8)
        params["evaluate"]["synthetic"]["schedule"]["cmnist"]["dm"].update(epochs=4, lr_milestones=[2])
    attrs = artifacts.read_attrs(args.data, kind="biased")
    assert attrs["bias_ratio"] == 0.95 and attrs["dataset"] == "cmnist", attrs

    setup = distill_stage.configure(params, "dm")
    probe = 2 if args.smoke else 50
    start = time.perf_counter()
    distill_stage.run(
        distill_stage.DistillSetup(
            "dm",
            setup.run,
            type(setup.cfg)(**{**setup.cfg.__dict__, "iterations": probe}),
            setup.dsa,
            setup.shared,
            setup.debias,
        ),
        args.data,
        None,
        progress=False,
    )
    synchronize(args.device)
    per_iteration = (time.perf_counter() - start) / probe  # includes set-up: an upper bound
    iterations = max(probe, int(args.seconds / per_iteration))
    cfg = type(setup.cfg)(**{**setup.cfg.__dict__, "iterations": iterations})
    run_setup = distill_stage.DistillSetup("dm", setup.run, cfg, setup.dsa, setup.shared, setup.debias)
    start = time.perf_counter()
    results, mean, std = distill_stage.run(run_setup, args.data, None, progress=False)
    synchronize(args.device)
    distill_seconds = time.perf_counter() - start
    synthetic = args.work / "dm.h5"
    artifacts.write_h5(
        synthetic,
        distill_stage.synthetic_groups(results, mean, std),
        run_setup.provenance(),
        kind="synthetic",
    )

    eval_setup = evaluate.configure(params, "dm")
    start = time.perf_counter()
    scores = evaluate.run(eval_setup, args.data, synthetic, progress=False)
    synchronize(args.device)
    eval_seconds = time.perf_counter() - start
    figures = {
        "card": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "reduced": args.smoke,
        "torch": torch.__version__,
        "cell": "cmnist rho 0.95 severity 4, DM, IPC 50, width 128, batch_real 256 (paper), fp32",
        "iterations": iterations,
        "paper_iterations": 20000,
        "ms_per_iteration": 1e3 * distill_seconds / iterations,
        "distill_seconds": distill_seconds,
        "evaluation": "3 networks, 1000 epochs, DSA (paper)",
        "evaluation_seconds": eval_seconds,
        "final_loss": results[0].losses[-1],
        "test_conflicting_accuracy": scores["test_conflicting"]["accuracy"],
        "test_uniform_accuracy": scores["test_uniform"]["accuracy"],
    }
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
