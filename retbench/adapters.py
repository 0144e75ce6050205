"""Model adapters: the small interface every model family implements.

A model is named ``family`` or ``family.tag`` (e.g. ``classical``, ``tinyclip.test``), or
``family:argument`` for open-ended families (``timm:resnet18``, ``local:PATH``). The tag
owns where the weights come from and the preprocessing that matches them, so the two can
never drift apart. Families live one file each in the ``retbench.model_adapters`` package
(the repository's ``model_adapters/`` folder, installed under retbench's name; found
automatically) or in third-party packages exposing the entry-point group ``retbench.adapters``.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from retbench.config import PRECISIONS
from retbench.errors import RetbenchError
from retbench.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FundusCrop, Preprocess
from retbench.registry import Contract, Registry
from retbench.weights import RANDOM, resolve_file

if TYPE_CHECKING:
    from retbench.spec import TaskSpec


AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ZeroShotSetup:
    """A model's zero-shot convention: its prompts per class, class-mean renormalisation, logit scale.

    ``encode_class``, when set, embeds one class's prompts together (FLAIR pads a class's
    descriptions to their longest and the padding enters its mean pooling), returning (n, D).
    What :meth:`Adapter.zero_shot_setup` returns and the ``zero_shot`` protocol follows.
    """

    prompts: list[list[str]]
    renormalize: bool = True
    logit_scale: float = 100.0
    encode_class: Callable[[list[str]], np.ndarray] | None = None


def check_precision(precision: str) -> None:
    """Refuse anything but :data:`PRECISIONS`, naming them."""
    if precision not in PRECISIONS:
        raise RetbenchError(f"precision must be one of {', '.join(PRECISIONS)}; got '{precision}'")


def precision_label(dtype: torch.dtype | None) -> str:
    """``fp32`` (no autocast), ``fp16 autocast`` or ``bf16 autocast``."""
    if dtype is None:
        return "fp32"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype] + " autocast"


@dataclass(frozen=True)
class WeightsTag:
    """One set of weights of a family: where they come from, their preprocessing and provenance.

    ``filename`` is the official file name (looked up under ``RETBENCH_WEIGHTS`` and in the
    Hugging Face cache of ``hub_id``); ``url`` is where a person downloads it; ``differs``
    says where retbench's default departs from the release's own code, if anywhere.
    """

    name: str
    source: str
    preprocess: Preprocess = field(default_factory=Preprocess)
    licence: str = "n/a"
    paper: str = ""
    feature: str = ""
    description: str = ""
    filename: str = ""
    hub_id: str = ""
    url: str = ""
    gated: bool = False
    code: str = ""
    differs: str = ""
    options: dict[str, Any] = field(default_factory=dict)


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
    example_arg: ClassVar[str] = ""  # an argument the contract tests build for open-ended families
    default_random: ClassVar[bool] = False  # no --weights means random init (timm:<name>, tinyclip)
    # CUDA execution: the autocast dtype of the release's own inference code (None = fp32; a tag may say
    # otherwise in ``options["precision"]``), replaced per instance by ``--precision``; see :meth:`__init__`
    autocast_dtype: ClassVar[torch.dtype | None] = None
    channels_last: ClassVar[bool] = False  # whether channels_last memory helps (CNNs)
    # the crop a task's ``fundus_crop: true`` selects for this model (its release's own method, if any)
    fundus_crop_method: ClassVar[FundusCrop] = "threshold"

    def __init__(self, tag: WeightsTag, weights: str | None = None, device: str = "cpu",
                 precision: str = "release") -> None:
        self._configure(tag, weights, device, precision)
        self.build()

    @classmethod
    def unbuilt(cls, tag: WeightsTag, weights: str | None = None) -> Adapter:
        """An instance whose network is not built: only for finding its files (:meth:`checkpoint`)."""
        adapter = cls.__new__(cls)
        adapter._configure(tag, weights, "cpu", "release")
        return adapter

    def _configure(self, tag: WeightsTag, weights: str | None, device: str, precision: str) -> None:
        self.tag = tag
        self.weights = weights
        self.device = torch.device(device)
        check_precision(precision)
        self.precision = precision  # as asked: release | fp32 | fp16 | bf16
        # the instance attribute shadows the family's ClassVar: what features.extract autocasts to on CUDA
        # (deliberate, so mypy's rule against assigning a ClassVar through an instance is silenced here)
        self.autocast_dtype = (  # type: ignore[misc]
            self.release_autocast_dtype() if precision == "release" else AUTOCAST[precision])
        self.preprocess: Preprocess = tag.preprocess
        self.weights_path: Path | None = None  # the checkpoint actually read, set by weights_file()

    def release_autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the release's inference code: the tag's ``options["precision"]``, else the family's."""
        if "precision" in self.tag.options:
            return AUTOCAST[self.tag.options["precision"]]
        return type(self).autocast_dtype

    @property
    def inference_precision(self) -> str:
        """What the forward pass runs in on this device: ``fp32``, or ``fp16``/``bf16`` autocast (CUDA only)."""
        return precision_label(self.autocast_dtype if self.device.type == "cuda" else None)

    @property
    def random_init(self) -> bool:
        """``--weights random``: the architecture with seeded random weights (baselines, smoke tests)."""
        return self.weights == RANDOM

    def weights_file(self, filename: str | None = None, *, what: str = "weights", hub_id: str | None = None,
                     url: str | None = None) -> Path:
        """The checkpoint for this tag: ``--weights``, ``RETBENCH_WEIGHTS`` or the hub cache (clear error if none).

        With ``filename`` (an auxiliary file such as a tokenizer's ``vocab.txt``) the lookup is
        the same, except that ``--weights`` counts only as the folder to look in (a checkpoint
        file's own folder), ``hub_id``/``url`` may name the repository that ships the file,
        and the weights identity is left alone.
        """
        aux = filename is not None and filename != self.tag.filename
        explicit = self.weights
        if aux and explicit and filename is not None:  # aux implies a filename; the test narrows it for mypy
            given = Path(explicit).expanduser()
            candidate = (given if given.is_dir() else given.parent) / filename
            explicit = str(candidate) if candidate.exists() else None
        path = resolve_file(
            self.name, filename or self.tag.filename, explicit=explicit,
            hub_id=self.tag.hub_id if hub_id is None else hub_id, url=self.tag.url if url is None else url,
            subdirs=(self.family, f"{self.family}.{self.tag.name}"), what=what, gated=self.tag.gated and not aux,
        )
        if not aux:
            self.weights_path = path
        return path

    def checkpoint(self) -> Path | None:
        """The weights file :meth:`build` reads, found without building anything (None: it reads none).

        Called on an :meth:`unbuilt` instance. The default covers families whose ``build`` reads
        ``weights_file()``; families that find their checkpoint otherwise override it.
        """
        if self.random_init or self.weights == "hub" or not (self.weights or self.tag.filename):
            return None
        return self.weights_file()

    @property
    def name(self) -> str:
        """The full model name, ``family.tag`` or ``family:argument``, plus ``@variant`` for non-default weights.

        ``--weights random`` gives ``@random`` (unless random init is the family's default),
        ``--weights hub`` ``@hub``, and a checkpoint file not named as the release's file
        ``@<file stem>``: results of different weights never share a name in the store.
        """
        sep = ":" if self.open_ended else "."
        variant = weights_variant(type(self), self.tag, self.weights)
        return f"{self.family}{sep}{self.tag.name}" + (f"@{variant}" if variant else "")

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

    def task_preprocess(self, hints: dict[str, Any]) -> Preprocess:
        """This model's preprocessing with a task's hints applied (e.g. the fundus crop)."""
        return self.preprocess.with_hints(hints, self.fundus_crop_method)

    def zero_shot_setup(self, spec: TaskSpec) -> ZeroShotSetup:
        """The release's zero-shot convention on ``spec``: prompts per class, renormalisation, logit scale.

        The default is CLIP's: the task's prompts (its template applied), class means
        renormalised, scale 100. Adapters override it where their release differs (FLAIR's
        caption and un-renormalised means, EyeCLIP's bare class names, learned scales).
        """
        return ZeroShotSetup(spec.class_prompts())

    def weights_identity(self) -> str:
        """A string that changes whenever the weights change: the sha256 of the file read."""
        if self.random_init:
            return f"random-init(seed=0):{self.family}.{self.tag.name}"
        path = self.weights_path or (Path(self.weights) if self.weights else None)
        if path is not None and path.is_file():
            return f"sha256:{file_sha256(path)}"
        return self.tag.source

    def describe(self) -> dict[str, Any]:
        """Identity recorded in every result."""
        return {
            "name": self.name,
            "family": self.family,
            "tag": self.tag.name,
            "source": self.tag.source,
            "weights": self.weights,
            "weights_path": str(self.weights_path) if self.weights_path else None,
            "weights_identity": self.weights_identity(),
            "hub_id": self.tag.hub_id,
            "url": self.tag.url,
            "code": self.tag.code,
            "licence": self.tag.licence,
            "feature": self.tag.feature,
            "has_text": self.has_text,
            "precision": self.inference_precision,  # what ran (CPU/MPS: always fp32, no autocast)
            "precision_requested": self.precision,
            "release_precision": precision_label(self.release_autocast_dtype()),  # on CUDA
        }

    @classmethod
    def resolve_tag(cls, name: str) -> WeightsTag:
        """The weights tag called ``name`` (``open_ended`` families build one)."""
        if name in cls.tags:
            return cls.tags[name]
        raise RetbenchError(
            f"model family '{cls.family}' has no tag '{name}'; tags: {', '.join(sorted(cls.tags))}"
        )


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def weights_variant(cls: type[Adapter], tag: WeightsTag, weights: str | None) -> str:
    """The ``@variant`` suffix of a model name for the weights asked for ('' for the default ones)."""
    if not weights:
        return ""
    if weights == RANDOM:
        return "" if cls.default_random else "random"
    if weights == "hub":
        return "hub"
    path = Path(weights)
    if path.is_dir() or (tag.filename and path.name == tag.filename):
        return ""
    return path.stem


def run_name(name: str, weights: str | None) -> str:
    """The name results of ``name`` with ``weights`` are stored under (no model is built)."""
    family, tag_name = split_model_name(name)
    cls = ADAPTERS.get(family)
    if cls.open_ended and not tag_name:
        raise RetbenchError(f"model family '{family}' needs an argument: {family}:<{cls.example_arg or 'name'}>")
    tag = cls.resolve_tag(tag_name or cls.default_tag)
    variant = weights_variant(cls, tag, weights)
    sep = ":" if cls.open_ended else "."
    return f"{family}{sep}{tag.name}" + (f"@{variant}" if variant else "")


def weights_to_read(name: str, weights: str | None) -> Path | None:
    """The checkpoint file model ``name`` with ``weights`` would read, found without building the network.

    None when it reads no file (``classical``, random init, ``--weights hub``) or when the file
    is not available here without downloading it (the model could not be built offline
    either). A ``--weights`` path that does not exist is an error.
    """
    from retbench.weights import cached_files_only

    family, tag_name = split_model_name(name)
    cls = ADAPTERS.get(family)
    tag = cls.resolve_tag(tag_name or cls.default_tag)
    with cached_files_only():
        try:
            path = cls.unbuilt(tag, weights).checkpoint()
        except RetbenchError:
            if weights in (None, RANDOM, "hub"):
                return None
            raise
    return path if path is not None and path.is_file() else None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (memoised per path, size and mtime: checkpoints are large)."""
    path = Path(path)
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
        _SHA_MEMO[memo_key] = digest.hexdigest()
    return _SHA_MEMO[memo_key]


ADAPTERS: Registry[type[Adapter]] = Registry("model", entry_point_group="retbench.adapters",
                                             contract=Contract("retbench.adapters.Adapter", subclass_of=Adapter))
_discovered = False


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator adding an adapter family to the registry."""
    ADAPTERS.register(cls.family, cls)
    return cls


def discover_adapters() -> None:
    """Import every module of the ``retbench.model_adapters`` package once (they self-register)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from retbench import model_adapters

    # mypy does not follow the package-dir mapping (model_adapters/ → retbench.model_adapters), so it cannot see this package
    for info in pkgutil.iter_modules(model_adapters.__path__):  # type: ignore[attr-defined]
        if not info.name.startswith("_"):
            importlib.import_module(f"{model_adapters.__name__}.{info.name}")  # type: ignore[attr-defined]


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
        if not tag:
            raise RetbenchError(f"model family '{family}' needs an argument: {family}:<{cls.example_arg or 'name'}>")
        return f"{family}:{tag}"
    return f"{family}.{tag or cls.default_tag}"


def load_model(name: str, weights: str | None = None, device: str = "cpu", precision: str = "release") -> Adapter:
    """Build the adapter for ``name`` with optional local ``weights`` on ``device``.

    ``precision`` (CUDA only; CPU runs fp32 whatever it says): ``release`` = the autocast of the
    release's own inference code (:attr:`Adapter.autocast_dtype`), or ``fp32``, ``fp16``, ``bf16``.
    """
    check_precision(precision)
    family, tag_name = split_model_name(name)
    cls = ADAPTERS.get(family)
    if cls.open_ended and not tag_name:
        raise RetbenchError(f"model family '{family}' needs an argument: {family}:<{cls.example_arg or 'name'}>")
    tag = cls.resolve_tag(tag_name or cls.default_tag)
    return cls(tag, weights=weights, device=device, precision=precision)


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
                "source": weights_source(tag),
                "licence": tag.licence,
                "input": describe_input(tag.preprocess),
                "feature": tag.feature,
                "text": tag.options.get("text") or ("yes" if cls.has_text else "no"),
                "differs": tag.differs or "-",
            })
    return rows


def weights_source(tag: WeightsTag) -> str:
    """Where the weights come from: hub id (and file), else the download URL, else the tag's source text."""
    if tag.hub_id:
        where = f"hf:{tag.hub_id}" + (f"/{tag.filename}" if tag.filename else "")
        return where + (" (gated)" if tag.gated else "")
    if tag.url:
        return f"{tag.url}" + (f" ({tag.filename})" if tag.filename and tag.filename not in tag.url else "")
    return tag.source


def describe_input(pre: Preprocess) -> str:
    """A short human description of a preprocessing, e.g. ``224 resize_crop(0.875) bicubic imagenet``."""
    resize = f"resize_crop({pre.crop_pct:g})" if pre.resize == "resize_crop" and pre.crop_pct != 1 else pre.resize
    norms: dict[tuple[tuple[float, ...], tuple[float, ...]], str] = {
        (IMAGENET_MEAN, IMAGENET_STD): "imagenet", (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD): "clip",
        ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)): "[0,1]", ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): "0.5/0.5",
    }
    norm = norms.get((tuple(pre.mean), tuple(pre.std)), "custom mean/std")
    if pre.normalization == "per_image":
        norm = "per-image z-score"
    parts = [f"{pre.size}", resize, pre.interpolation, norm]
    if pre.fundus_crop != "none":
        parts.append(f"crop:{pre.fundus_crop}")
    if pre.grayscale:
        parts.append("grey")
    return " ".join(parts)
