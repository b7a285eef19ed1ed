"""What the attention zoo study is: its mixers and their groups, tasks, recipe and sizes, and how a
mixer is built for it.

`ORDER` (the tables' order), `FAMILIES` (the plots'), the groups the targets use (`LOCAL`,
`EXACT_LOCAL`, `LINEAR_COST`, `NEAR_LINEAR`), `FAMILY_COLOURS`, `HEADLINE` (mixers with at least
--headline-seeds seeds), the comparison rules' levels (`ESCAPE_LEVEL`, `INTERVAL_Z`,
`SEPARATE_MIN_SEEDS`: engine.zoo.accuracy applies them), `TASKS` / `RECIPE`
(configs), `STAGE1` (NAT-Tiny's stage-1 width), `SIDES`, `PATTERN_SIDE`, `QUICK` (--quick's sizes and
overrides); `registered_mixers`, `check_mixers`, `window_options` / `window_overrides` (every exact
local mixer at NA's window extent), `stage1_mixer`, `task_config`; `UsageError`. The parts are
`engine.zoo.scaling`, `.accuracy`, `.patterns`.
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# The zoo's mixers by mechanism family (the plots colour by family), in the order the tables list
# them: the baseline, the exact local ones, the sparse global ones, then the approximations.
FAMILIES = {
    "baseline": ("full",),
    "local": ("na", "dilated", "sasa", "window", "shifted_window", "halo"),  # no global reach in one layer
    "local + global tokens": ("global", "longformer"),
    "sparse": ("bigbird", "reformer", "sinkhorn"),
    "low-rank": ("linformer", "compressed"),
    "kernel": ("linear", "performer"),
    "synthesizer": ("synthesizer_dense", "synthesizer_random"),
}
# A colour per family in every zoo figure (baseline black).
FAMILY_COLOURS = {
    "baseline": "black",
    "local": "tab:blue",
    "local + global tokens": "tab:orange",
    "sparse": "tab:green",
    "low-rank": "tab:red",
    "kernel": "tab:purple",
    "synthesizer": "tab:brown",
}
ORDER = tuple(name for members in FAMILIES.values() for name in members)  # mixers registered later: appended
BASELINE = "full"
LOCAL = FAMILIES["local"]
EXACT_LOCAL = ("sasa", "window", "shifted_window", "halo")  # NA's rivals at equal window size
LINEAR_COST = (
    "na", "dilated", "window", "shifted_window", "halo", "sasa", "global", "longformer", "bigbird",
    "linformer", "compressed", "linear", "performer",
)  # fmt: skip
NEAR_LINEAR = ("reformer", "sinkhorn")
HEADLINE = ("na", "full")  # mixers that get at least --headline-seeds seeds
# The long-range task's one definition of "escaped" (left the chance plateau): far-pair (val) top-1
# above chance by more than a model answering independently of the class would reach with
# probability ESCAPE_LEVEL (one-sided binomial tail at p = 1/2 on the run's balanced val set: 58.0%
# of 400 images, 232 right). 0.001 rather than 0.05: the seeds study scores 144 pathfinder runs, and
# at 0.05 one in twenty runs that answered at random would count as escaped.
ESCAPE_LEVEL = 0.001
INTERVAL_Z = 1.959964  # 95% two-sided normal quantile: the Wilson intervals of the escape rates
SEPARATE_MIN_SEEDS = 3  # shapes: seed ranges are compared only with this many seeds on each side
TASKS = {"shapes": "configs/zoo_shapes.yaml", "pathfinder": "configs/zoo_pathfinder.yaml"}
RECIPE = "configs/zoo.yaml"

STAGE1 = dict(dim=64, num_heads=2, kernel_size=7)  # NAT-Tiny stage 1
SIDES = (16, 32, 64, 128)
SLOPE_FROM = 32  # the slope is fitted over sides >= this (small maps are overhead-bound)
PATTERN_SIDE = 14

QUICK = dict(
    sides=(8, 16),
    rounds=2,
    mixers_accuracy=("na", "full"),
    overrides=(
        "sched.epochs=1",
        "sched.warmup_epochs=0",
        "train.batch_size=8",
        "data.pathfinder.train_per_class=8",
        "data.pathfinder.val_per_class=4",
        "data.pathfinder.image_size=32",
        "data.pathfinder.dot_radius=3.0",
        "data.synthetic.num_classes=3",
        "data.synthetic.train_per_class=6",
        "data.synthetic.val_per_class=4",
        "data.synthetic.image_size=32",
        "data.img_size=32",
    ),
)


class UsageError(Exception):
    """A user mistake: printed as one `error:` line, exit 2."""


def registered_mixers() -> list[str]:
    import models  # noqa: F401  (registers every mixer family)
    from models.mixers import MIXERS

    return [m for m in ORDER if m in MIXERS] + sorted(set(MIXERS) - set(ORDER))


def check_mixers(names: list[str], available: list[str]) -> list[str]:
    unknown = [n for n in names if n not in available]
    if unknown:
        raise UsageError(f"unknown mixer(s) {', '.join(unknown)}; registered: {', '.join(available)}")
    return names


def window_options(name: str, kernel_size: int) -> dict:
    """Options that give an exact local mixer sizing its own windows the key extent of NA's
    `kernel_size` window: NAT passes `kernel_size` only to mixers that take one (na, dilated, sasa,
    global, longformer), so Swin windows and HaloNet blocks would keep their defaults (7; 7 + halo 3
    = 13 keys wide; BigBird's 3 x 3 window of 7 x 7 blocks: 21, the whole 16 x 16 map of the zoo's
    stage 1) and the study would compare different reaches. HaloNet: block k - 2, halo 1 (k wide).
    BigBird: the smallest block b whose 3 x 3-block window covers NA's (3b >= k: 6 wide for k = 5,
    3 for k = 3, 9 for k = 7), its random blocks and global token unchanged."""
    if name in ("window", "shifted_window"):
        return {"window_size": kernel_size}
    if name == "halo":
        return {"block_size": kernel_size - 2, "halo": 1}
    if name == "bigbird":
        return {"block_size": -(-kernel_size // 3)}
    return {}


def stage1_mixer(name: str, seed: int = 0) -> torch.nn.Module:
    """Mixer `name` as a NAT-Tiny stage-1 block would build it (dim 64, 2 heads, window 7)."""
    from models.mixers import build_mixer

    torch.manual_seed(seed)
    k = STAGE1["kernel_size"]
    return build_mixer(
        name, STAGE1["dim"], STAGE1["num_heads"], kernel_size=k, options=window_options(name, k)
    )


def task_config(task: str, overrides=()) -> dict:
    """The study's recipe with `task`'s overlay and `overrides`: what train.py will run."""
    from configs import load_config

    return load_config([REPO / RECIPE, REPO / TASKS[task]], overrides)


# A row whose backbone cycles mixers over each stage's blocks: Swin alternates plain (W-MSA) and
# shifted (SW-MSA) windows, so its row is that alternation (sessions <= 23 shifted every block)
STAGE_CYCLES = {"shifted_window": ("window", "shifted_window")}


def mixer_override(mixer: str, task: str, overrides: list[str]) -> str:
    """The train.py `model.kwargs.mixer` override of a study row: the mixer in every block, or its
    row's cycle (`STAGE_CYCLES`) in every stage."""
    import json

    if mixer not in STAGE_CYCLES:
        return f"model.kwargs.mixer={mixer}"
    stages = len(task_config(task, overrides)["model"]["kwargs"]["depths"])
    return f"model.kwargs.mixer={json.dumps([list(STAGE_CYCLES[mixer])] * stages)}"


def window_overrides(mixer: str, task: str, overrides: list[str]) -> list[str]:
    """train.py overrides giving `mixer` the backbone's window per stage (`window_options`)."""
    import json

    kernel_sizes = task_config(task, overrides)["model"]["kwargs"]["kernel_size"]
    if isinstance(kernel_sizes, int):  # one window for every stage
        options = window_options(mixer, kernel_sizes)
    else:
        options = [window_options(mixer, k) for k in kernel_sizes]
    return [f"model.kwargs.mixer_kwargs={json.dumps(options)}"] if any(options) else []
