"""Train a face-embedding model with the Multi-Similarity loss.

    python scripts/train.py                                   # synthetic_demo preset, one process
    torchrun --standalone --nproc_per_node=2 scripts/train.py # the same on 2 processes (gloo on CPU)
    torchrun --nproc_per_node=8 scripts/train.py --config ms1mv2_r50 data.root=/data/faces_emore
    python scripts/train.py --config my_run.yaml optim.lr=0.05 loss.beta=50 train.max_steps=100

Settings resolve as: dataclass defaults -> preset or YAML file (--config) -> dotted overrides. The
resolved config is written to <train.output_dir>/config.yaml; `--print-config` shows it and exits.
Presets: see `--list-presets`.

Exit codes: 0 done; 1 training failed (diverged, a checkpoint could not be written or loaded, or an
error with a traceback); 2 a bad config value or launch, found before any process group starts;
128 + signal (143 for SIGTERM, 130 for SIGINT) stopped by that signal after a step and its checkpoint
(run the same command again to continue).
"""

from __future__ import annotations

import argparse
import logging
import sys

from facems.config import ConfigError, config_to_dict, list_presets, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="preset name or YAML file (default: synthetic_demo)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 data.p=32")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    args = parser.parse_args(argv)
    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    # The training stack (torch and the rest) is imported only now: a bad value is reported in well
    # under a second, on every rank of a torchrun launch alike.
    from facems.models import WeightsError
    from facems.train.checkpoint import CheckpointError
    from facems.train.distributed import LaunchError
    from facems.train.loop import TrainingDiverged, TrainingInterrupted, fit

    try:
        result = fit(cfg, device=args.device)
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"train.py: launch error: {e}", file=sys.stderr)
        return 2
    except WeightsError as e:
        print(f"train.py: model.init_from: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 128 + e.signum
    logging.getLogger("facems").info(
        "done: step %d, %.1f img/s, best mean accuracy %.4f at step %d, artefacts in %s",
        result.step,
        result.images_per_s,
        result.best_score,
        result.best_step,
        result.run_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
