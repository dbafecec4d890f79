"""Create-by-name registries: the one registry style of the models area (timm's `register_model`).

    IMAGE_BACKBONES = Registry("model.image_backbone")

    @IMAGE_BACKBONES.register("deit_small")
    def _deit_small(mcfg, image_size, pretrained): ...

    IMAGE_BACKBONES.get(mcfg.image_backbone)     # the builder, or ConfigError naming the key and the choices

Three registries use it: the model classes (`lgur.models.lgur.MODELS`, key `model.name`), the image
backbones (`lgur.models.backbones.image.IMAGE_BACKBONES`) and the text backbones
(`lgur.models.backbones.text.TEXT_BACKBONES`). A name is registered once; order of registration is
the order the choices are listed in.
"""
from __future__ import annotations

from typing import Callable, Iterator, TypeVar

from lgur.errors import ConfigError

T = TypeVar("T")


class Registry:
    """name -> builder (a function or a class), for the config key `key`."""

    def __init__(self, key: str):
        self.key = key
        self._entries: dict[str, object] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated function or class under `name`."""
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self._entries[name] = obj
            return obj
        return add

    def get(self, name: str):
        """The builder registered as `name`; ConfigError naming the config key and the choices otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable value from a config file
            raise ConfigError(f"{self.key}={name!r} is not one of {', '.join(self._entries)}") from None

    __getitem__ = get

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.key!r}: {', '.join(self._entries)})"
