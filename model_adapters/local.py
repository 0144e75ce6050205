"""Models trained by retbench itself (family ``local``): ``local:PATH``.

``PATH`` (relative or absolute) is a folder in the ``retbench.local/1`` format described in
:mod:`retbench.local_model_format` (``retbench_model.json`` + ``model.safetensors`` [+ ``text/``]);
:func:`retbench.local_model_format.save_local_model` writes it. The folder defines everything:

- image features for probes: the timm model's pooled output (``num_classes=0``);
- with a text tower: image-text embeddings ``visual_proj(feature)`` and
  ``text_proj(tower(texts))`` (a missing projection is the identity);
- zero-shot: CLIP's convention (the task's prompts, class means renormalised) with the
  stored temperature ``exp(logit_scale)`` when the checkpoint has one, else 100;
- preprocessing: read from the folder, so a model trained at 64 px is evaluated at 64 px.

The model is recorded as ``local:<folder name>``; its identity is the sha256 of
``model.safetensors``. ``--weights FILE`` replaces ``model.safetensors`` (same layout);
``--weights random`` builds the folder's architecture with seeded random weights. Conventions
are retbench's own (no external release to follow).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from retbench.adapters import Adapter, WeightsTag, ZeroShotSetup, register_adapter
from retbench.errors import RetbenchError
from retbench.local_model_format import CODE_ID, WEIGHTS_FILE, LocalFormatError, LocalModelConfig, read_local_config

if TYPE_CHECKING:
    from retbench.spec import TaskSpec
    from retbench.text_towers import Pooling, TextTower

USAGE = "local:PATH names a folder written by retbench's trainers (retbench_model.json + model.safetensors)"


@register_adapter
class LocalAdapter(Adapter):
    """A model in retbench's own on-disk format."""

    visual: Any  # a timm model: typed Any, its attributes are the architecture's own (create_model returns nn.Module)
    family = "local"
    # bf16 autocast: retbench's trainers (retbench/pretrain/trainer.py) train these models under bf16 autocast
    autocast_dtype: ClassVar[torch.dtype | None] = torch.bfloat16
    open_ended = True
    example_arg = ""  # needs a folder: the contract test writes one with save_local_model
    has_text = False  # per model: set from the folder's config when built
    tags: ClassVar[dict[str, WeightsTag]] = {
        "<PATH>": WeightsTag("<PATH>", "a folder written by retbench (retbench_model.json + model.safetensors)",
                             licence="per model", feature="timm pooled features; joint space if a text tower is stored",
                             options={"text": "if stored"}),
    }

    @classmethod
    def resolve_tag(cls, name: str) -> WeightsTag:
        """Read and validate the folder's config; the tag is named after the folder."""
        if not name or name == "<PATH>" or (name == cls.default_tag and not Path(name).is_dir()):  # bare 'local'/'local:'
            raise RetbenchError(f"model 'local' needs a folder: {USAGE}")
        folder = Path(name).expanduser().resolve()
        if not folder.is_dir():
            raise RetbenchError(f"local model folder not found: {folder} ({USAGE})")
        cfg = read_local_config(folder)
        text = f" + text tower {cfg.text.tower}" if cfg.text else ""
        return WeightsTag(
            folder.name, f"retbench local model {folder}", cfg.preprocess,
            licence=str(cfg.card.get("licence", "per model (see its card)")),
            feature=f"{cfg.timm_name} pooled features{text}", description=cfg.recipe,
            filename=WEIGHTS_FILE, code=CODE_ID, options={"folder": str(folder)},
        )

    def checkpoint(self) -> Path | None:
        """``--weights FILE``, else the folder's ``model.safetensors`` (what :meth:`build` reads), found without building."""
        if self.random_init:
            return None
        return self.weights_file() if self.weights else Path(self.tag.options["folder"]) / WEIGHTS_FILE

    def build(self) -> None:
        """Build the timm model, text tower and projections from the config; load ``model.safetensors``."""
        import timm

        self.config: LocalModelConfig = read_local_config(self.tag.options["folder"])
        cfg = self.config
        self.has_text = cfg.text is not None  # type: ignore[misc]  # per model: deliberately shadows the ClassVar
        rng = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            try:
                self.visual = timm.create_model(cfg.timm_name, num_classes=0, **cfg.timm_kwargs)
            except Exception as exc:  # noqa: BLE001 - bad kwargs: one line naming the key
                raise LocalFormatError(cfg.config_path, "vision.kwargs", f"timm.create_model failed: {exc}") from None
            modules: dict[str, nn.Module] = {"visual": self.visual}
            self.visual_proj = self._projection(cfg.visual_proj_bias, self.visual.num_features, "visual_proj")
            self.text = self.text_proj = None
            if cfg.text is not None:
                from retbench.text_towers import text_tower_from_files

                t = cfg.text
                self.text = text_tower_from_files(cfg.folder / t.files, t.tower, normalize=t.normalize,
                                                  pooling=cast("Pooling", t.pooling),  # read_local_config checked it
                                                  max_length=t.max_length)
                self.text_proj = self._projection(cfg.text_proj_bias, self.text.dim, "text_proj")
                modules["text"] = self.text
                self._check_joint_widths()
        finally:
            torch.random.set_rng_state(rng)
        for name, proj in (("visual_proj", self.visual_proj), ("text_proj", self.text_proj)):
            if proj is not None:
                modules[name] = proj
        self.logit_scale: float | None = None
        if not self.random_init:
            self._load(modules)
        for module in modules.values():
            module.eval().to(self.device)

    def _projection(self, bias: bool | None, in_features: int, key: str) -> nn.Linear | None:
        if bias is None:
            return None
        if self.config.embed_dim is None:
            raise LocalFormatError(self.config.config_path, "embed_dim", f"required when {key} is set")
        return nn.Linear(in_features, self.config.embed_dim, bias=bias)

    def _check_joint_widths(self) -> None:
        image = self.visual_proj.out_features if self.visual_proj is not None else self.visual.num_features
        # called once the text tower is built
        text = self.text_proj.out_features if self.text_proj is not None else cast("TextTower", self.text).dim
        if image != text:
            raise LocalFormatError(self.config.config_path, "embed_dim",
                                   f"image ({image}-d) and text ({text}-d) embeddings differ; add projections")

    def _load(self, modules: dict[str, nn.Module]) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.weights_file() if self.weights else self.config.weights_path
        self.weights_path = path
        if not path.is_file():
            raise RetbenchError(f"local model weights not found: {path}")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise RetbenchError(f"{path}: not a readable safetensors file ({exc})") from None
        if "logit_scale" in state:
            self.logit_scale = float(state.pop("logit_scale"))
        for prefix, module in modules.items():
            own = module.state_dict()
            part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            missing = [k for k in own if k not in part]
            if missing:
                raise LocalFormatError(path, f"{prefix}.{missing[0]}", f"missing ({len(missing)} {prefix} tensors absent)")
            for k, v in part.items():
                if k not in own:
                    raise LocalFormatError(path, f"{prefix}.{k}", "not a parameter of the configured model")
                if tuple(v.shape) != tuple(own[k].shape):
                    raise LocalFormatError(path, f"{prefix}.{k}", f"shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
            module.load_state_dict(part)
        unknown = [k for k in state if k.split(".")[0] not in modules]
        if unknown:
            raise LocalFormatError(path, unknown[0], f"unexpected tensor for this config ({len(unknown)} such)")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The timm model's pooled features."""
        return self.visual(pixels)

    def encode_image_joint(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings in the image-text space: ``visual_proj(feature)``."""
        if self.text is None:
            return super().encode_image_joint(pixels)
        feats = self.visual(pixels)
        return self.visual_proj(feats) if self.visual_proj is not None else feats

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings in the image-text space: ``text_proj(tower(texts))``."""
        if self.text is None:
            return super().encode_text(texts)
        emb = self.text(texts)
        return self.text_proj(emb) if self.text_proj is not None else emb

    def zero_shot_setup(self, spec: TaskSpec) -> ZeroShotSetup:
        """CLIP's convention with the stored temperature ``exp(logit_scale)`` when there is one."""
        import math

        scale = math.exp(self.logit_scale) if self.logit_scale is not None else 100.0
        return ZeroShotSetup(spec.class_prompts(), renormalize=True, logit_scale=scale)

    def describe(self) -> dict:
        """Identity plus the folder's recipe and card."""
        return {**super().describe(), "has_text": self.has_text, "folder": str(self.config.folder),
                "recipe": self.config.recipe, "created": self.config.created, "card": self.config.card}
