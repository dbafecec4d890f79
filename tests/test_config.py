"""Config as data: overrides and recipes are type-checked against the defaults, with the key named."""
from __future__ import annotations

import pytest

from lgur.config import config_from_dict, load_config
from lgur.errors import ConfigError


@pytest.mark.parametrize("override, key", [
    ("optim.epochs=ten", "optim.epochs"),
    ("optim.epochs=1.5", "optim.epochs"),
    ("optim.epochs=null", "optim.epochs"),
    ("train.compile=1", "train.compile"),
    ("data.image_size=384", "data.image_size"),
    ("data.image_size=[384, tall]", r"data.image_size\[1\]"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.milestones=[20, x]", r"optim.milestones\[1\]"),
    ("eval.directions=t2i", "eval.directions"),
    ("model.use_pgu=maybe", "model.use_pgu"),
])
def test_override_of_the_wrong_type_is_refused_with_its_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("lgur_tiny", [override])


def test_overrides_keep_the_defaults_types():
    cfg = load_config("lgur_tiny", ["optim.lr=1e-4", "optim.betas=[1, 0.9]", "name=2024", "train.amp=off",
                                    "optim.grad_clip=1.0", "data.root=/data/x", "optim.epochs=3"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [1.0, 0.9] and all(isinstance(b, float) for b in cfg.optim.betas)
    assert cfg.name == "2024"
    assert cfg.train.amp == "off"  # YAML 1.1 reads a bare `off` as False; for a string key it means "off"
    assert cfg.optim.grad_clip == 1.0 and cfg.data.root == "/data/x"
    assert cfg.optim.epochs == 3 and isinstance(cfg.optim.epochs, int)


def test_a_recipe_value_of_the_wrong_type_is_refused(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="optim.epochs"):
        load_config(recipe)


def test_every_shipped_recipe_loads():
    for name in ["lgur_cuhk", "lgur_icfg", "lgur_rstp", "lgur_small_synth", "lgur_tiny", "ablation_baseline",
                 "ablation_msd", "ablation_msd_cmg", "ablation_dga"]:
        assert load_config(name).name


def test_saved_configs_with_boolean_amp_still_load():
    cfg = config_from_dict({"train": {"amp": False}})
    assert cfg.train.amp == "off"


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="optim.epoch"):
        load_config(None, ["optim.epoch=3"])


def test_cli_errors_are_one_readable_line(monkeypatch, capsys, tmp_path):
    from lgur import cli

    assert cli.main(["data-check", str(tmp_path / "missing")]) == 2  # a user's mistake: exit 2, one line
    assert "error:" in capsys.readouterr().err

    def broken(args):
        raise ZeroDivisionError("a bug")

    parser = cli.build_parser()
    args = parser.parse_args(["data-check", str(tmp_path)])
    args.func = broken
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: args})())
    monkeypatch.delenv("LGUR_DEBUG", raising=False)
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert "internal error (ZeroDivisionError): a bug" in err and "Traceback" not in err
    monkeypatch.setenv("LGUR_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main([])


def test_lgur_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from lgur.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_recipes_ship_in_the_package_and_resolve_from_any_directory(tmp_path, monkeypatch):
    from lgur.config import RECIPES, resolve_config_path

    monkeypatch.chdir(tmp_path)  # not the checkout: no configs/ folder here
    assert RECIPES.parent.name == "lgur" and (RECIPES / "lgur_cuhk.yaml").is_file()
    for spelling in ("lgur_cuhk", "lgur_cuhk.yaml", "configs/lgur_cuhk.yaml"):
        assert resolve_config_path(spelling) == RECIPES / "lgur_cuhk.yaml"
    icfg = load_config("lgur_icfg")  # its _base_ (lgur_cuhk.yaml) resolves beside it
    assert icfg.name == "lgur_icfg" and icfg.model.image_backbone == "deit_small"
    own = tmp_path / "lgur_cuhk.yaml"  # a file the user names always wins over a shipped recipe
    own.write_text("optim:\n  epochs: 3\n")
    assert load_config("lgur_cuhk.yaml").optim.epochs == 3 and load_config("lgur_cuhk").optim.epochs != 3
    with pytest.raises(ConfigError, match="recipes: .*lgur_tiny"):
        resolve_config_path("no_such_recipe")
    # the checkout's configs/ is the same folder (a link), so edits there are the shipped recipes
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[1] / "configs"
    if checkout.exists():
        assert checkout.resolve() == RECIPES.resolve()
