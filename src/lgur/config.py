"""Configuration as data: defaults.yaml declares every key; recipes and `key=value` override it.

    cfg = load_config("lgur_cuhk", ["optim.epochs=10", "data.root=/data/CUHK-PEDES"])  # a recipe by name
    cfg = load_config("my_recipe.yaml")                                                 # or any file
    cfg.optim.epochs        # attribute access
    cfg["optim"]["epochs"]  # or item access
    save_config(cfg, run_dir / "config.yaml")

Recipes ship inside the package (lgur/configs/*.yaml, found with importlib.resources from any working
directory; a source checkout also has them at configs/, a link to src/lgur/configs). A recipe may name
`_base_: other.yaml` (relative to itself) to inherit from another recipe.
Unknown keys are an error, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable

import yaml

from lgur.errors import ConfigError

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")
# the shipped recipes; lgur is installed as files (wheel or editable), never zip-imported, so a Path
RECIPES = Path(str(files("lgur").joinpath("configs")))


class Config(dict):
    """A nested dict with attribute access. Values that are dicts are Configs too."""

    def __init__(self, data: dict | None = None):
        super().__init__()
        for k, v in (data or {}).items():
            self[k] = Config(v) if isinstance(v, dict) else v

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = Config(value) if isinstance(value, dict) else value

    def __deepcopy__(self, memo):
        return Config(copy.deepcopy(self.to_dict(), memo))

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def defaults() -> Config:
    return Config(yaml.safe_load(DEFAULTS_PATH.read_text()))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or a shipped recipe by name: `lgur_cuhk`, `lgur_cuhk.yaml` or `configs/lgur_cuhk.yaml` (the
    README's spelling, valid from any working directory). An existing file always wins."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    names = [p, Path(f"{p}.yaml")]
    if not p.is_absolute() and len(p.parts) > 1 and p.parts[0] == "configs":
        rest = Path(*p.parts[1:])
        names += [rest, Path(f"{rest}.yaml")]
    for cand in (RECIPES / n for n in names):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []
    raise ConfigError(f"config file not found: {name_or_path} (recipes: {', '.join(known) or 'none'})")


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _read_recipe((path.parent / base), seen + (path,))
    _merge(merged, data, strict=False, where=str(path))
    return merged


def _merge(dst: dict, src: dict, strict: bool, where: str, prefix: str = "") -> None:
    for k, v in src.items():
        key = f"{prefix}{k}"
        if strict and k not in dst:
            near = ", ".join(sorted(dst)) if isinstance(dst, dict) else ""
            raise ConfigError(f"{where}: unknown config key '{key}' (known here: {near})")
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, strict, where, key + ".")
        else:
            dst[k] = _coerce(dst.get(k), v, key, where)


def _coerce(old: Any, new: Any, key: str, where: str) -> Any:
    """Check `new` against the type of the default `old` (yacs-style): int stays int, bool stays bool, lists stay
    lists (element types checked against the default's elements), a float accepts ints and numeric strings
    (YAML reads `1e-4` as a string). A null default takes any scalar or list; only a null default takes null."""
    def bad(kind: str) -> ConfigError:
        return ConfigError(f"{where}: '{key}' must be {kind}, got {new!r}")

    if old is None or isinstance(old, dict):
        return new
    if new is None:
        raise bad(f"a value like its default {old!r} (null is allowed only where the default is null)")
    if isinstance(old, bool):
        if not isinstance(new, bool):
            raise bad("true or false")
        return new
    if isinstance(old, int):
        if isinstance(new, bool) or not isinstance(new, int):
            raise bad("an integer")
        return new
    if isinstance(old, float):
        if isinstance(new, str):
            try:
                return float(new)
            except ValueError:
                raise bad("a number") from None
        if isinstance(new, bool) or not isinstance(new, (int, float)):
            raise bad("a number")
        return float(new)
    if isinstance(old, str):
        if isinstance(new, bool):  # YAML 1.1 reads a bare off/no (on/yes) as a boolean: `amp: off`
            return "on" if new else "off"
        if isinstance(new, (int, float)):
            return str(new)  # `name=2024`: YAML read a number where a string is meant
        if not isinstance(new, str):
            raise bad("a string")
        return new
    if isinstance(old, list):
        if not isinstance(new, list):
            raise bad("a list, e.g. [1, 2]")
        if old:
            return [_coerce(old[0], v, f"{key}[{i}]", where) for i, v in enumerate(new)]
        return new
    return new


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> None:
    """Apply `a.b.c=value` strings; the value is parsed as YAML (`1e-4`, `[1, 2]`, `null`, `true`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = cfg
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{item}'")
            if i == len(parts) - 1:
                if isinstance(node[part], dict):
                    raise ConfigError(f"'{key}' is a section, not a value")
                node[part] = _coerce(node[part], value, key, "override")
            else:
                node = node[part]


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- recipe (with its _base_ chain) <- overrides. Validates that every key is known."""
    cfg = defaults().to_dict()
    if path is not None:
        p = resolve_config_path(path)
        _merge(cfg, _read_recipe(p), strict=True, where=str(p))
    apply_overrides(cfg, overrides)
    return Config(cfg)


def load_command_config(path: str | Path | None, overrides: Iterable[str], command: str,
                        sections: tuple[str, ...], keys: tuple[str, ...] = ("device",)) -> Config:
    """The config of a command that runs a trained model (`lgur index/search/serve/export`): defaults <-
    recipe <- overrides, like `lgur train`, but the overrides may set only the command's `sections`
    (e.g. search.*) and top-level `keys` (the runtime: device). The model is used as it was trained: its
    checkpoint's own config decides model.* and data.* (architecture, image size, normalisation, tokenizer),
    so an override of those is refused with a readable error, as is any key the command does not read (a
    silent no-op would look like it worked). A recipe given with --config may hold training keys: only its
    `sections` and `keys` are read."""
    allowed = ", ".join([f"{s}.*" for s in sections] + list(keys))
    for item in overrides:
        if "=" not in item:
            continue  # load_config names the malformed override
        key = item.split("=", 1)[0].strip()
        top = key.split(".")[0]
        if top in sections and "." in key or key in keys:
            continue
        if top in ("model", "data"):
            raise ConfigError(f"'{key}' cannot be overridden for `lgur {command}`: the checkpoint's own config "
                              f"decides the model and its preprocessing (it is used as it was trained); "
                              f"overrides here may set {allowed}")
        raise ConfigError(f"'{key}' is not read by `lgur {command}`; overrides here may set {allowed}")
    return load_config(path, overrides)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a saved dict (e.g. a checkpoint's), filling keys added since with defaults."""
    cfg = defaults().to_dict()
    _merge(cfg, data, strict=False, where="saved config")
    return Config(cfg)


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict() if isinstance(cfg, Config) else cfg, sort_keys=False))
