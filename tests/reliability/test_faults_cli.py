"""Bad command-line and config values for ``scripts/train.py``: one line, exit code 2, nothing started.

"Nothing started" is checked by what a started run leaves behind: the trainer creates its output
folder (and log files) only after the process group exists, so that folder must not exist. The
plain-``python`` cases run as concurrent subprocesses (one fixture); the world-size case runs under
``torchrun`` with 2 processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from facems.data.synthetic import SyntheticFaces
from facems.data.synthetic_release import write_train_pack
from facems.models import list_models

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
IDENTITIES = 12


def _env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**clean, "OMP_NUM_THREADS": "1"}


def _base(root: Path, out: Path) -> list[str]:
    return [
        f"data.root={root}",
        f"train.output_dir={out}",
        "data.val_targets=[]",
        "data.p=2",
        "data.k=2",
        "data.num_workers=0",
        "model.name=iresnet_tiny_s2",
        "log.tensorboard=false",
    ]


# case -> (overrides appended to the base ones, words the one line must contain)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "negative_batch": (["data.p=-4"], ["data.p = -4", "expected an integer >= 1"]),
    "negative_eval_batch": (["eval.batch_size=-1"], ["eval.batch_size = -1", "expected an integer >= 1"]),
    "unknown_backbone": (
        ["model.name=resnet9000"],
        ["model.name = 'resnet9000'", "registered model", "iresnet50"],
    ),
    "missing_data_root": (["data.root={tmp}/no_such_pack"], ["data.root", "no_such_pack", "existing folder"]),
    "missing_val_set": (["data.val_targets=[lfw]"], ["data.val_targets", "lfw.bin", "does not exist"]),
    "more_identities_per_step_than_the_pack": (
        [f"data.p={IDENTITIES + 1}"],
        [f"data.p = {IDENTITIES + 1} with 1 process(es)", f"lists {IDENTITIES}", f"data.p <= {IDENTITIES}"],
    ),
}


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_pack")
    write_train_pack(str(root), SyntheticFaces(IDENTITIES, 4, seed=3), quality=90)
    return root


@pytest.fixture(scope="module")
def outcomes(pack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """Every case's (exit code, stderr, output folder), run concurrently."""
    tmp = tmp_path_factory.mktemp("cli_runs")
    procs = {}
    for name, (extra, _) in CASES.items():
        out = tmp / name
        args = [*_base(pack, out), *(e.replace("{tmp}", str(tmp)) for e in extra)]
        procs[name] = (
            subprocess.Popen(
                [sys.executable, str(SCRIPT), "--device", "cpu", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            ),
            out,
        )
    results = {}
    for name, (proc, out) in procs.items():
        _, err = proc.communicate(timeout=240)
        results[name] = (proc.returncode, err, out)
    return results


def test_the_known_backbones_are_the_registry() -> None:
    assert "iresnet50" in list_models() and "resnet9000" not in list_models()


@pytest.mark.slow  # six interpreter start-ups (four import torch): about 20 s on 2 idle cores
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_value_is_one_line_exit_2_before_anything_starts(
    outcomes: dict[str, tuple[int, str, Path]], case: str
) -> None:
    code, err, out = outcomes[case]
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("train.py: config error: ")
    for words in CASES[case][1]:
        assert words in lines[0], (words, lines[0])
    assert not out.exists()  # no run folder: no logger, process group or data loader was set up


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_world_size_that_does_not_fit_the_pack_fails_on_every_rank_before_the_process_group(
    pack: Path, tmp_path: Path
) -> None:
    # 7 identities per rank: fine on one process (7 <= 12), 14 per global step on two is not.
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(SCRIPT),
            "--device",
            "cpu",
            *_base(pack, out),
            "data.p=7",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert result.returncode != 0
    # The first rank to fail prints the line and exits 2; the agent then stops the other one, which
    # may not have got as far as printing it.
    line = "train.py: config error: data.p = 7 with 2 process(es): a global step draws p * world_size = 14"
    assert result.stderr.count(line) >= 1, result.stderr[-3000:]
    assert "expected data.p <= 6 for 2 process(es), or at most 1 processes" in result.stderr
    assert "(exitcode: 2)" in result.stderr, result.stderr[-3000:]  # the agent's report of the failed rank
    assert not out.exists()
