"""Weights in and out: .safetensors everywhere a checkpoint goes, weights export, Hugging Face layouts.

The Hugging Face state dicts are built here from this repo's model by an independent mapping written
from transformers' modeling_nat.py / modeling_dinat.py (NatForImageClassification, DinatModel, ...):
separate query / key / value linears, `layer_scale_parameters` (2, dim), downsamplers at the end of a
level. Loading them through `checkpoint_filter_fn` must give back the original model exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from test_eval import trained  # noqa: F401  (the fixture: a tiny trained run)
from test_nat import TINY_DINAT, TINY_NAT, randomized, tiny
from test_train import load_entry_point, run_cli

from configs import ConfigError
from engine.checkpoint import (
    checkpoint_settings,
    extract_state_dict,
    load_checkpoint,
    load_model_weights,
    save_weights,
)
from engine.errors import CheckpointError
from models.nat import checkpoint_filter_fn

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# The Hugging Face layout, from transformers' module tree (not from models/nat.py's remap)


def to_hf(sd: dict[str, torch.Tensor], model, base: str | None = "nat") -> dict[str, torch.Tensor]:
    """This repo's NAT state dict -> transformers' Nat/Dinat key layout.

    base "nat" / "dinat": *ForImageClassification (NatModel under `base.`, `classifier` outside it);
    None: a bare NatModel / DinatModel (no prefix, no classifier)."""
    p = f"{base}." if base else ""
    hf, used = {}, set()

    def put(hf_key: str, *ours: str, value: torch.Tensor | None = None):
        used.update(ours)
        hf[p + hf_key] = sd[ours[0]] if value is None else value

    for kind in ("weight", "bias"):
        put(f"embeddings.patch_embeddings.projection.0.{kind}", f"stem.conv1.{kind}")
        put(f"embeddings.patch_embeddings.projection.1.{kind}", f"stem.conv2.{kind}")
        put(f"embeddings.norm.{kind}", f"stem.norm.{kind}")
        put(f"layernorm.{kind}", f"norm.{kind}")
    for i, depth in enumerate(model.depths):
        for j in range(depth):
            o, lay = f"stages.{i}.blocks.{j}.", f"encoder.levels.{i}.layers.{j}."
            for kind in ("weight", "bias"):
                q, k, v = sd[o + f"attn.qkv.{kind}"].chunk(3, dim=0)
                put(lay + f"attention.self.query.{kind}", o + f"attn.qkv.{kind}", value=q)
                put(lay + f"attention.self.key.{kind}", o + f"attn.qkv.{kind}", value=k)
                put(lay + f"attention.self.value.{kind}", o + f"attn.qkv.{kind}", value=v)
                put(lay + f"layernorm_before.{kind}", o + f"norm1.{kind}")
                put(lay + f"attention.output.dense.{kind}", o + f"attn.proj.{kind}")
                put(lay + f"layernorm_after.{kind}", o + f"norm2.{kind}")
                put(lay + f"intermediate.dense.{kind}", o + f"mlp.fc1.{kind}")
                put(lay + f"output.dense.{kind}", o + f"mlp.fc2.{kind}")
            put(lay + "attention.self.rpb", o + "attn.rpb")
            if o + "ls1.gamma" in sd:
                gammas = torch.stack([sd[o + "ls1.gamma"], sd[o + "ls2.gamma"]])
                put(lay + "layer_scale_parameters", o + "ls1.gamma", o + "ls2.gamma", value=gammas)
        if i > 0:  # HF: level i - 1 ends with the downsampler that opens stage i here
            down = f"encoder.levels.{i - 1}.downsample."
            put(down + "reduction.weight", f"stages.{i}.downsample.conv.weight")
            for kind in ("weight", "bias"):
                put(down + f"norm.{kind}", f"stages.{i}.downsample.norm.{kind}")
    if base:
        for kind in ("weight", "bias"):
            used.add(f"head.fc.{kind}")
            hf[f"classifier.{kind}"] = sd[f"head.fc.{kind}"]
    unmapped = set(sd) - used - ({"head.fc.weight", "head.fc.bias"} if not base else set())
    assert not unmapped, f"test mapping incomplete: {sorted(unmapped)}"
    return hf


def test_hf_mapping_has_transformers_shapes():
    """Shapes as transformers creates them (NeighborhoodAttention, NatLayer, NatDownsampler, ...)."""
    model = tiny(TINY_NAT)
    hf = to_hf(model.state_dict(), model)
    dim, k, heads = 32, 3, 2  # stage 1 of TINY_NAT
    lay = "nat.encoder.levels.1.layers.0."
    assert hf[lay + "attention.self.rpb"].shape == (heads, 2 * k - 1, 2 * k - 1)
    for name in ("query", "key", "value"):
        assert hf[lay + f"attention.self.{name}.weight"].shape == (dim, dim)
    assert hf[lay + "layer_scale_parameters"].shape == (2, dim)
    assert hf[lay + "intermediate.dense.weight"].shape == (int(2.0 * dim), dim)
    assert hf["nat.encoder.levels.0.downsample.reduction.weight"].shape == (dim, dim // 2, 3, 3)
    assert "nat.encoder.levels.0.downsample.reduction.bias" not in hf  # bias=False in NatDownsampler
    assert "nat.encoder.levels.3.downsample.norm.weight" not in hf  # no downsampler after the last level
    assert hf["nat.embeddings.patch_embeddings.projection.0.weight"].shape == (8, 3, 3, 3)
    assert hf["classifier.weight"].shape == (7, 128)


@pytest.mark.parametrize(
    "arch,base", [(TINY_NAT, "nat"), (TINY_DINAT, "dinat")], ids=["NatForImageClassification", "Dinat"]
)
def test_hf_classification_state_dict_gives_the_same_model(arch, base):
    ref = randomized(tiny(arch)).double().eval()
    hf = to_hf(ref.state_dict(), ref, base)
    model = tiny(arch).double().eval()
    model.load_state_dict(checkpoint_filter_fn(hf, model), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(2, 3, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["official", "hugging_face"])
def test_a_foreign_file_of_another_class_count_keeps_its_classifier(layout):
    """An official or HF file names its classifier `head` / `classifier`: its class count is read in
    this repo's names, so the model is made with it and the trained classifier loads (not a fresh one)."""
    from test_nat import ref_tiny

    from engine.factory import create_model_for_checkpoint

    if layout == "official":
        ref = ref_tiny(TINY_NAT, num_classes=7)
        sd = ref.state_dict()
    else:
        ref = randomized(tiny(TINY_NAT)).double().eval()
        sd = to_hf(ref.state_dict(), ref, "nat")
    kwargs = yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in TINY_NAT.items()})
    model, _ = create_model_for_checkpoint("nat_mini", sd, sd, "file", model_kwargs=kwargs)
    assert model.num_classes == 7
    x = torch.randn(2, 3, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.double().eval()(x), ref(x), rtol=1e-10, atol=1e-10)


def test_hf_bare_model_state_dict_loads_headless():
    """DinatModel / NatModel: no `dinat.` prefix, no classifier: a num_classes=0 model, or a fresh head."""
    ref = randomized(tiny(TINY_DINAT)).double().eval()
    hf = to_hf(ref.state_dict(), ref, base=None)
    assert not any(k.startswith(("dinat.", "classifier")) for k in hf)
    headless = tiny(TINY_DINAT, num_classes=0).double().eval()
    headless.load_state_dict(checkpoint_filter_fn(hf, headless), strict=True)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(headless(x), ref.forward_head(ref.forward_features(x), pre_logits=True))
    with_head = tiny(TINY_DINAT).double()
    fresh_head = with_head.head.fc.weight.clone()
    with_head.load_state_dict(checkpoint_filter_fn(hf, with_head), strict=True)
    assert torch.equal(with_head.head.fc.weight, fresh_head)


def test_hf_wrong_variant_is_the_official_error():
    with torch.device("meta"):
        tiny_model = timm.create_model("nat_tiny")
        mini = timm.create_model("nat_mini")
    hf = {k: torch.zeros(v.shape) for k, v in to_hf(tiny_model.state_dict(), tiny_model).items()}
    with pytest.raises(
        ValueError, match=r"looks like nat_tiny / dinat_tiny \(.*depths \(3, 4, 18, 5\).*model is nat_mini"
    ):
        checkpoint_filter_fn(hf, mini)
    backbone = dict(hf, **{"hidden_states_norms.stage4.weight": torch.zeros(512)})
    backbone = {k.removeprefix("nat."): v for k, v in backbone.items() if not k.startswith("classifier")}
    with pytest.raises(ValueError, match=r"dense backbone's .*create nat_mini with stage_norms=True"):
        checkpoint_filter_fn(backbone, mini)  # a NatBackbone's weights need the dense layout
    del hf["nat.encoder.levels.0.layers.1.attention.self.key.bias"]  # a lone q/v is reported, not guessed
    with pytest.raises(ValueError, match=r"unexpected \[.*levels.0.layers.1.attention.self.query.bias"):
        checkpoint_filter_fn(hf, tiny_model)


# ------------------------------------------------------------------------------------------------
# .safetensors through the one loader, timm and torch.hub


def test_save_weights_writes_plain_safetensors_and_pth(tmp_path):
    base = torch.randn(4, 6)
    sd = {"a": base, "alias": base, "strided": base.t(), "empty": torch.zeros(0)}  # shared + strided
    for name in ("w.safetensors", "w.pth"):
        save_weights(sd, tmp_path / name)
        got = load_checkpoint(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), name
        assert not list(tmp_path.glob("*.tmp"))
    # both formats readable as the umask allows (safetensors itself writes 0600)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == (tmp_path / "w.pth").stat().st_mode & 0o777
    # readable by safetensors itself, with the metadata timm / HF write
    assert torch.equal(safetensors.torch.load_file(tmp_path / "w.safetensors")["strided"], base.t())
    from safetensors import safe_open

    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_timm_train_checkpoint_loads_with_its_argparse_namespace(tmp_path):
    """timm's train.py saves its command line (an argparse.Namespace) under 'args', which timm's own
    loader allows under weights_only; so does this repo's, and the weights then load as any file's."""
    import argparse

    from engine.factory import create_model_for_checkpoint

    ref = randomized(tiny(TINY_NAT)).eval()
    args = argparse.Namespace(model="nat_mini", lr=1e-3)
    torch.save(
        {"epoch": 3, "arch": "nat_mini", "state_dict": ref.state_dict(), "args": args}, tmp_path / "t.pth.tar"
    )
    ckpt = load_checkpoint(tmp_path / "t.pth.tar")
    assert ckpt["args"].model == "nat_mini"
    kwargs = yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in TINY_NAT.items()})
    sd = extract_state_dict(ckpt, tmp_path / "t.pth.tar")
    model, _ = create_model_for_checkpoint("nat_mini", ckpt, sd, tmp_path / "t.pth.tar", model_kwargs=kwargs)
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # a checkpoint with settings: --model-kwargs goes over its kwargs, the others kept
    mine = {"arch": "nat_mini", "model_kwargs": yaml.safe_load(kwargs), "num_classes": 7, "state_dict": sd}
    model, used = create_model_for_checkpoint("nat_mini", mine, sd, "file", model_kwargs="{kernel_size: 5}")
    assert used == {**yaml.safe_load(kwargs), "kernel_size": 5} and model.kernel_size == (5, 5, 5, 5)
    with pytest.raises(ConfigError, match="--model-kwargs is not YAML"):
        create_model_for_checkpoint("nat_mini", mine, sd, "file", model_kwargs="{kernel_size: 5")


def test_a_run_folder_means_its_best_weights_to_every_loader(tmp_path):
    """eval.py and export_weights.py read a run folder's model_best.pth.tar; torch.hub, export.py,
    visualize_attention.py and fine-tuning read folders through load_checkpoint, which took
    last.pth.tar first: a hub model was not the one eval.py had scored. Now best, last only alone."""
    from engine.factory import hub_model

    best, last = (randomized(tiny(TINY_NAT), seed).state_dict() for seed in (1, 2))
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_NAT.items()}
    for name, sd in (("model_best.pth.tar", best), ("last.pth.tar", last)):
        ckpt = {"arch": "nat_mini", "model_kwargs": kwargs, "num_classes": 7, "state_dict": sd}
        torch.save(ckpt, tmp_path / name)
    model = hub_model("nat_mini", pretrained=str(tmp_path))  # torch.hub.load's entry points
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())
    (tmp_path / "model_best.pth.tar").unlink()
    assert torch.equal(load_checkpoint(tmp_path)["state_dict"]["head.fc.weight"], last["head.fc.weight"])


def test_a_pickle_of_other_objects_is_refused_without_torchs_weights_only_false_advice(tmp_path):
    """torch's own message for a file a weights-only load refuses suggests weights_only=False (code
    execution from the file); ours says what the file holds and what to give instead."""
    import pickle

    (tmp_path / "objects.pth").write_bytes(pickle.dumps(slice(1, 2)))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "objects.pth")
    message = str(error.value)
    assert (
        "holds Python objects" in message
        and ".safetensors" in message
        and "weights_only=False" not in message
    )


def test_corrupt_or_foreign_safetensors_is_one_clear_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    pickle = tmp_path / "pickle.safetensors"
    torch.save({"a": torch.zeros(1)}, pickle)
    for path in (junk, pickle):
        with pytest.raises(
            CheckpointError, match=r"cannot read safetensors file .*\); it must be a safetensors"
        ):
            load_checkpoint(path)
    with pytest.raises(ValueError, match=r"cannot read safetensors file '.*junk.safetensors' for nat_mini"):
        timm.create_model("nat_mini", pretrained=str(junk))
    (tmp_path / "empty.pth").write_bytes(b"")  # through timm's own loader too: torch files, empty or cut
    torch.save(timm.create_model("nat_mini").state_dict(), tmp_path / "cut.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "cut.pth").read_bytes()[:100_000])
    for name in ("empty.pth", "cut.pth"):
        overlay = dict(file=str(tmp_path / name))
        with pytest.raises(
            ValueError, match=rf"cannot read checkpoint file '.*{name}' for nat_mini .*cut short"
        ):
            timm.create_model("nat_mini", pretrained=True, pretrained_cfg_overlay=overlay)
    resnet = tmp_path / "resnet.safetensors"
    save_weights(timm.create_model("resnet10t", num_classes=3).state_dict(), resnet)
    sd = extract_state_dict(load_checkpoint(resnet), resnet)
    with pytest.raises(
        CheckpointError, match="does not match model 'nat_mini': checkpoint is not a NAT/DiNAT"
    ):
        load_model_weights(tiny(TINY_NAT), sd, resnet, "nat_mini", resize_head=False)


@pytest.mark.parametrize("layout", ["ours", "hf"])
def test_safetensors_file_through_create_model_and_torch_hub(tmp_path, layout):
    ref = randomized(tiny(TINY_NAT, num_classes=1000)).eval()
    sd = ref.state_dict() if layout == "ours" else to_hf(ref.state_dict(), ref)
    path = save_weights(sd, tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        model = timm.create_model(
            "nat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY_NAT
        )
        torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)
        hub = torch.hub.load(str(ROOT), "nat_mini", source="local", pretrained=str(path), **TINY_NAT)
        torch.testing.assert_close(hub.eval()(x), expected, rtol=0, atol=0)


def test_hf_file_of_another_variant_fails_through_create_model(tmp_path):
    ref = tiny(TINY_DINAT, num_classes=1000)
    path = save_weights(to_hf(ref.state_dict(), ref, "dinat"), tmp_path / "dinat_hf.safetensors")
    with pytest.raises(
        ValueError, match=r"looks like an unregistered .*depths \(2, 2, 2, 1\).*model is nat_mini"
    ):
        timm.create_model("nat_mini", pretrained=str(path), **TINY_NAT)


# ------------------------------------------------------------------------------------------------
# Command line: export, eval, train


def test_export_resume_and_corrupt_file_in_process(tmp_path, capsys, monkeypatch):
    """A run checkpoint (ours) -> its EMA weights as .safetensors; --resume refuses them; junk: one line."""
    model = randomized(tiny(TINY_NAT, num_classes=3))
    ema = randomized(tiny(TINY_NAT, num_classes=3), seed=1)
    ckpt = dict(
        arch="nat_mini",
        model_kwargs=json.loads(json.dumps(TINY_NAT)),
        num_classes=3,
        classes=["disk", "square", "star"],
        data_config={"input_size": [3, 40, 48], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0},
        state_dict={f"module.{k}": v for k, v in model.state_dict().items()},  # a DDP save
        state_dict_ema=ema.state_dict(),
        optimizer={},
    )
    torch.save(ckpt, tmp_path / "model_best.pth.tar")
    settings = {k: ckpt[k] for k in ("arch", "model_kwargs", "num_classes", "classes", "data_config")}
    out = tmp_path / "ema.safetensors"
    export = load_entry_point("scripts/export_weights.py")
    assert export.main([str(tmp_path), str(out), "--use-ema"]) == 0  # a run folder: its best
    assert "wrote" in capsys.readouterr().out
    got = safetensors.torch.load_file(out)
    assert got.keys() == ema.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in ema.state_dict().items())
    assert export.main([str(tmp_path / "model_best.pth.tar"), str(tmp_path / "w.pth")]) == 0
    got = torch.load(tmp_path / "w.pth", weights_only=True)
    assert all(torch.equal(got["state_dict"][k], v) for k, v in model.state_dict().items())
    capsys.readouterr()
    # both files carry the model and data settings, read back by the one reader
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["data_config"]) == ckpt["data_config"]  # JSON strings
    for path in (out, tmp_path / "w.pth"):
        assert checkpoint_settings(load_checkpoint(path)) == settings, path
    # torch.hub rebuilds the model from them alone (its kwargs, classes, transform)
    hub = torch.hub.load(str(ROOT), "nat_mini", source="local", pretrained=str(tmp_path / "w.pth"))
    assert hub.num_classes == 3
    assert all(torch.equal(hub.state_dict()[k], v) for k, v in model.state_dict().items())
    assert timm.data.resolve_data_config(model=hub)["input_size"] == (3, 40, 48)
    assert hub.default_cfg is hub.pretrained_cfg  # timm's older name reads the same settings
    with pytest.raises(CheckpointError, match="holds nat_mini weights .* not dinat_mini; use nat_mini"):
        torch.hub.load(str(ROOT), "dinat_mini", source="local", pretrained=str(tmp_path / "w.pth"))
    # features_only: the weights go into the model timm wraps
    features = torch.hub.load(str(ROOT), "nat_mini", source="local", pretrained=str(out), features_only=True)
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        want = ema.eval().forward_intermediates(x, intermediates_only=True)
        for got_map, want_map in zip(features.eval()(x), want, strict=True):
            torch.testing.assert_close(got_map, want_map, rtol=0, atol=0)

    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    for main, args, expected in (
        (load_entry_point("train.py").main, ["--resume", str(out)], "use --checkpoint instead of --resume"),
        (load_entry_point("eval.py").main, [str(bad), "--model", "nat_mini"], "cannot read safetensors file"),
        (export.main, [str(bad), str(tmp_path / "x.safetensors")], "cannot read safetensors file"),
        (export.main, [str(out), str(tmp_path / "x.onnx")], "must end in one of .safetensors"),
    ):
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_export_converts_hf_layout(tmp_path):
    ref = randomized(tiny(TINY_NAT, num_classes=1000))
    hf_path = tmp_path / "pytorch_model.bin"  # what the hub's shi-labs/nat-* repos hold
    torch.save(to_hf(ref.state_dict(), ref), hf_path)
    out = tmp_path / "nat.safetensors"
    kwargs = yaml.safe_dump(json.loads(json.dumps(TINY_NAT)))  # YAML 1.1 reads json's 1e-05 as a string
    export = load_entry_point("scripts/export_weights.py")
    assert export.main([str(hf_path), str(out), "--model", "nat_mini", "--model-kwargs", kwargs]) == 0
    got = safetensors.torch.load_file(out)
    assert got.keys() == ref.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


@pytest.mark.slow
def test_eval_and_fine_tune_from_exported_safetensors(trained, tmp_path):  # noqa: F811
    """End to end through the command lines of a trained run: the exported file scores the same."""
    work, run = trained
    out = tmp_path / "best_ema.safetensors"
    p = run_cli("scripts/export_weights.py", run / "model_best.pth.tar", out, "--use-ema", check=0)
    assert "wrote" in p.stdout and "sha256" in p.stdout
    ckpt = torch.load(run / "model_best.pth.tar", map_location="cpu", weights_only=True)
    kwargs = json.dumps(ckpt["model_kwargs"])
    config = work / "tiny.yaml"
    run_cli("eval.py", run / "model_best.pth.tar", "--use-ema", "-o", tmp_path / "ckpt.json", check=0)
    run_cli("eval.py", out, "--model", "nat_mini", "--model-kwargs", kwargs, "-c", config, check=0)
    a = json.loads((tmp_path / "ckpt.json").read_text())
    b = json.loads((tmp_path / "best_ema-eval.json").read_text())  # default name: .safetensors stripped
    assert a["top1"] == b["top1"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    p = run_cli(
        "train.py", "-c", config, "--checkpoint", out, "--output", tmp_path / "runs", "--experiment", "ft"
    )
    assert p.returncode == 0 and "fine-tuning from" in p.stdout + p.stderr, p.stderr
