"""Model adapters: the small interface every model family implements.

A model is named ``family`` or ``family.tag`` (e.g. ``classical``, ``tinyclip.test``), or
``family:argument`` for open-ended families (``timm:resnet18``, ``local:PATH``). The tag
owns where the weights come from and the preprocessing that matches them, so the two can
never drift apart. Families live one file each in the top-level ``model_adapters``
package (found automatically) or in third-party packages exposing the entry-point group
``retbench.adapters``.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from retbench.errors import RetbenchError
from retbench.preprocess import Preprocess
from retbench.registry import Registry


@dataclass(frozen=True)
class WeightsTag:
    """One set of weights of a family: source, preprocessing and provenance."""

    name: str
    source: str
    preprocess: Preprocess = field(default_factory=Preprocess)
    licence: str = "n/a"
    paper: str = ""
    feature: str = ""
    description: str = ""


class Adapter(ABC):
    """A frozen image (and optionally text) encoder with its preprocessing.

    Subclasses set ``family``, ``tags`` and ``has_text`` and implement :meth:`build`
    and :meth:`encode_image`; those with a text tower also implement
    :meth:`encode_image_joint` (image embeddings in the shared image-text space) and
    :meth:`encode_text`.
    """

    family: ClassVar[str]
    tags: ClassVar[dict[str, WeightsTag]] = {}
    default_tag: ClassVar[str] = "default"
    has_text: ClassVar[bool] = False
    open_ended: ClassVar[bool] = False  # family:ARG names, e.g. timm:resnet18

    def __init__(self, tag: WeightsTag, weights: str | None = None, device: str = "cpu") -> None:
        self.tag = tag
        self.weights = weights
        self.device = torch.device(device)
        self.preprocess: Preprocess = tag.preprocess
        self.build()

    @property
    def name(self) -> str:
        """The full model name, ``family.tag`` or ``family:argument``."""
        sep = ":" if self.open_ended else "."
        return f"{self.family}{sep}{self.tag.name}"

    @abstractmethod
    def build(self) -> None:
        """Create the network(s) and load weights onto ``self.device``."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features for probes: (B, 3, H, W) normalised pixels → (B, D)."""

    def encode_image_joint(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings in the image-text space (zero-shot); text models only."""
        raise RetbenchError(f"model '{self.name}' has no text tower")

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings in the image-text space; text models only."""
        raise RetbenchError(f"model '{self.name}' has no text tower")

    def weights_identity(self) -> str:
        """A string that changes whenever the weights change (sha256 of a file when local)."""
        if self.weights:
            return f"sha256:{file_sha256(Path(self.weights))}"
        return self.tag.source

    def describe(self) -> dict[str, Any]:
        """Identity recorded in every result."""
        return {
            "name": self.name,
            "family": self.family,
            "tag": self.tag.name,
            "source": self.tag.source,
            "weights": self.weights,
            "weights_identity": self.weights_identity(),
            "licence": self.tag.licence,
            "feature": self.tag.feature,
            "has_text": self.has_text,
        }

    @classmethod
    def resolve_tag(cls, name: str) -> WeightsTag:
        """The weights tag called ``name`` (``open_ended`` families build one)."""
        if name in cls.tags:
            return cls.tags[name]
        raise RetbenchError(
            f"model family '{cls.family}' has no tag '{name}'; tags: {', '.join(sorted(cls.tags))}"
        )


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


ADAPTERS: Registry[type[Adapter]] = Registry("model", entry_point_group="retbench.adapters")
_discovered = False


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator adding an adapter family to the registry."""
    ADAPTERS.register(cls.family, cls)
    return cls


def discover_adapters() -> None:
    """Import every module of the ``model_adapters`` package once (they self-register)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import model_adapters

    for info in pkgutil.iter_modules(model_adapters.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"model_adapters.{info.name}")


def split_model_name(name: str) -> tuple[str, str | None]:
    """``family.tag`` / ``family:arg`` / ``family`` → (family, tag or None)."""
    discover_adapters()
    if ":" in name:
        family, _, arg = name.partition(":")
        return family, arg
    if name in ADAPTERS:
        return name, None
    family, _, tag = name.partition(".")
    return family, tag or None


def canonical_model_name(name: str) -> str:
    """``family`` → ``family.<default tag>``; other forms unchanged (no model is built)."""
    family, tag = split_model_name(name)
    cls = ADAPTERS.get(family)
    if cls.open_ended:
        return f"{family}:{tag}"
    return f"{family}.{tag or cls.default_tag}"


def load_model(name: str, weights: str | None = None, device: str = "cpu") -> Adapter:
    """Build the adapter for ``name`` with optional local ``weights`` on ``device``."""
    family, tag_name = split_model_name(name)
    cls = ADAPTERS.get(family)
    tag = cls.resolve_tag(tag_name or cls.default_tag)
    return cls(tag, weights=weights, device=device)


def list_models() -> list[dict[str, Any]]:
    """One row per registered family and tag, for ``retbench list models``."""
    discover_adapters()
    rows = []
    for family in ADAPTERS.names():
        cls = ADAPTERS.get(family)
        for tag in cls.tags.values():
            sep = ":" if cls.open_ended else "."
            rows.append({
                "model": f"{family}{sep}{tag.name}",
                "source": tag.source,
                "licence": tag.licence,
                "input": f"{tag.preprocess.size}px {tag.preprocess.resize}",
                "feature": tag.feature,
                "text": "yes" if cls.has_text else "no",
            })
    return rows
