"""configs/: inheritance, composition, overrides, typed values, unknown keys with their nearest neighbour."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import configs
from configs import ConfigError, load_config

CONFIG_DIR = Path(configs.__file__).parent
# train.py's configs; configs/dense_*.yaml are scripts/dense.py's (their own schema, tests/test_dense.py)
SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("dense_"))


def write(tmp_path, name, data) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_resolves(name):
    cfg = load_config([CONFIG_DIR / name])
    assert configs.validate(cfg) == cfg


def test_required_configs_exist():
    for name in [
        "nat_mini",
        "nat_tiny",
        "nat_small",
        "nat_base",
        "dinat_mini",
        "dinat_tiny",
        "dinat_small",
        "dinat_base",
        "swin_tiny",
        "convnext_tiny",
        "imagenet100",
        "imagenet10",
        "quickstart",
    ]:
        assert f"{name}.yaml" in SHIPPED, name


@pytest.mark.parametrize(
    "name, drop_path",
    [
        ("nat_mini", 0.2),
        ("nat_tiny", 0.2),
        ("nat_small", 0.3),
        ("nat_base", 0.5),
        ("dinat_mini", 0.2),
        ("dinat_tiny", 0.2),
        ("dinat_small", 0.3),
        ("dinat_base", 0.5),
    ],
)
def test_nat_recipe(name, drop_path):
    cfg = load_config([f"configs/{name}.yaml"]) if Path("configs").is_dir() else load_config([name])
    assert cfg["model"]["name"] == name and cfg["model"]["drop_path_rate"] == drop_path
    o, s, a = cfg["optim"], cfg["sched"], cfg["aug"]
    assert (o["opt"], o["lr_base"], o["lr_base_size"], o["weight_decay"]) == ("adamw", 1e-3, 1024, 0.05)
    assert (s["sched"], s["epochs"], s["warmup_epochs"]) == ("cosine", 300, 20)
    assert a["auto_augment"].startswith("rand-m9") and (a["mixup"], a["cutmix"]) == (0.8, 1.0)
    assert (a["smoothing"], a["reprob"]) == (0.1, 0.25)


def test_swin_and_convnext_share_the_recipe():
    nat, swin, cnx = (load_config([n]) for n in ("nat_tiny", "swin_tiny", "convnext_tiny"))
    for section in ("optim", "sched", "aug", "data", "train"):
        assert nat[section] == swin[section] == cnx[section], section


def test_inheritance_chain_and_composition(tmp_path):
    write(
        tmp_path, "a.yaml", {"optim": {"lr": 0.1, "weight_decay": 0.3}, "model": {"kwargs": {"x": 1, "y": 2}}}
    )
    write(tmp_path, "b.yaml", {"base": "a.yaml", "optim": {"lr": 0.2}, "model": {"kwargs": {"x": 5}}})
    overlay = write(tmp_path, "c.yaml", {"sched": {"epochs": 7}, "optim": {"weight_decay": 0.0}})
    cfg = load_config([tmp_path / "b.yaml", overlay])
    assert cfg["optim"]["lr"] == 0.2  # child wins
    assert cfg["optim"]["weight_decay"] == 0.0  # later file wins
    assert cfg["sched"]["epochs"] == 7
    assert cfg["sched"]["warmup_epochs"] == configs.DEFAULTS["sched"]["warmup_epochs"]  # defaults fill in
    assert cfg["model"]["kwargs"] == {"x": 5}  # free-form dicts replace, not merge


def test_a_base_is_the_one_beside_its_file_not_a_namesake_in_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    write(tmp_path / "configs", "a.yaml", {"optim": {"lr": 0.1}})
    write(tmp_path / "configs", "b.yaml", {"base": "a.yaml"})
    write(tmp_path, "a.yaml", {"optim": {"lr": 9.0}})  # a stray file of the same name
    monkeypatch.chdir(tmp_path)
    assert load_config(["configs/b.yaml"])["optim"]["lr"] == 0.1


def test_base_list_and_cycle(tmp_path):
    write(tmp_path, "x.yaml", {"optim": {"lr": 1.0}})
    write(tmp_path, "y.yaml", {"sched": {"epochs": 3}})
    write(tmp_path, "z.yaml", {"base": ["x.yaml", "y.yaml"]})
    cfg = load_config([tmp_path / "z.yaml"])
    assert cfg["optim"]["lr"] == 1.0 and cfg["sched"]["epochs"] == 3
    write(tmp_path, "p.yaml", {"base": "q.yaml"})
    write(tmp_path, "q.yaml", {"base": "p.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config([tmp_path / "p.yaml"])


def test_overrides_are_typed():
    cfg = load_config(
        ["quickstart"],
        [
            "optim.lr=5e-4",
            "train.batch_size=8",
            "model.kwargs.embed_dim=48",
            "aug.scale=[0.3, 1]",
            "train.progress=on",
            "ema.enabled=true",
            "data.class_list=null",
        ],
    )
    assert cfg["optim"]["lr"] == 5e-4 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["train"]["batch_size"] == 8
    plain = load_config(["quickstart"])["model"]["kwargs"]
    assert cfg["model"]["kwargs"] == {**plain, "embed_dim": 48}  # one key set, the others kept
    assert cfg["aug"]["scale"] == [0.3, 1]
    assert cfg["train"]["progress"] == "on" and cfg["ema"]["enabled"] is True


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 5e-4 as a string: the schema turns it back into the float it means
    cfg = load_config([write(tmp_path, "s.yaml", "optim:\n  lr: 5e-4\n")])
    assert cfg["optim"]["lr"] == 5e-4


@pytest.mark.parametrize(
    "override, nearest",
    [
        ("optim.lrr=1", "optim.lr"),
        ("train.lr=1", "optim.lr"),
        ("sched.warmup_epoch=1", "sched.warmup_epochs"),
        ("optimizer.lr=1", "optim.lr"),
        ("model.drop_path=0.1", "model.drop_path_rate"),
        ("train.batchsize=3", "train.batch_size"),
        ("optim.learning_rate=1", "optim.lr"),  # a known alias (was: optim.clip_grad)
        ("optim.wd=0.1", "optim.weight_decay"),  # initials
        ("train.num_epochs=3", "sched.epochs"),  # alias, in another section
        ("optim.learn_rate=1", "optim.lr"),  # initials of the words
        ("sched.warmup=5", "sched.warmup_epochs"),  # this section's alias before ema.warmup
        ("train.amp-dtype=float16", "train.amp_dtype"),  # a flag's hyphens
        ("aug.mixup-off-epoch=3", "aug.mixup_off_epoch"),
    ],
)
def test_unknown_key_names_nearest_neighbour(override, nearest):
    with pytest.raises(ConfigError) as e:
        load_config(["quickstart"], [override])
    key = override.split("=")[0]
    assert f"unknown config key '{key}'" in str(e.value)
    assert f"did you mean '{nearest}" in str(e.value)


@pytest.mark.parametrize("decay", [1.5, 0.0, -0.5])
def test_layer_decay_outside_0_1_is_an_error(decay):
    with pytest.raises(ConfigError, match=r"'optim.layer_decay' is .*; it must be in \(0, 1\]"):
        load_config(["quickstart"], [f"optim.layer_decay={decay}"])
    assert load_config(["quickstart"], ["optim.layer_decay=1"])["optim"]["layer_decay"] == 1.0


def test_unknown_key_in_file_names_the_file(tmp_path):
    p = write(tmp_path, "bad.yaml", {"optim": {"weight_decy": 0.1}})
    with pytest.raises(
        ConfigError, match=r"unknown config key 'optim.weight_decay'|'optim.weight_decy'.*bad.yaml"
    ):
        load_config([p])
    with pytest.raises(ConfigError, match="did you mean 'optim.weight_decay'"):
        load_config([p])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=abc", "must be int"),
        ("optim.lr=fast", "must be float"),
        ("train.amp_dtype=float8", "must be one of"),
        ("optim=3", "is a section"),
        ("optim.lr", "key=value"),
        # each crashed mid-run (a division by zero, timm's asserts) before it was checked here
        ("train.eval_interval=0", "'train.eval_interval' must be >= 1, got 0"),
        ("train.log_interval=0", "'train.log_interval' must be >= 1"),
        ("train.checkpoint_hist=0", "'train.checkpoint_hist' must be >= 1"),
        ("data.workers=-1", "'data.workers' must be >= 0"),
        ("aug.scale=[1.0]", "'aug.scale' must be two positive numbers"),
        ("data.img_size=[32, 0]", "'data.img_size' must be two positive numbers"),
        ("sched.sched=plateau", "set sched.step_on_updates=false"),
        # transform settings timm asserts on (or divides by) once the run has started
        ("data.img_size=0", "data.img_size and data.crop_pct must be > 0"),
        ("data.crop_pct=-1.0", "data.img_size and data.crop_pct must be > 0"),
        ("data.mean=[0.5, 0.5]", "'data.mean' must be three numbers"),
        ("data.std=[0.0, 0.0, 0.0]", "'data.std' must be positive"),
        ("data.interpolation=foo", "'data.interpolation' .* must be one of"),
        ("aug.train_interpolation=foo", "'aug.train_interpolation' .* must be one of"),
    ],
)
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["quickstart"], [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([write(tmp_path, "broken.yaml", "optim: [1,\n")])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config([write(tmp_path, "list.yaml", "- 1\n- 2\n")])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(["nat_tiny", "imagenet10"], ["optim.lr=3e-4"])
    configs.dump_config(cfg, tmp_path / "c.yaml")
    assert configs.validate(yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg
    assert cfg["data"]["class_list"][0] == "n01440764" and cfg["sched"]["epochs"] == 100
