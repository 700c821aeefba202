"""What a detector family gives the framework: one row of the table ``models.FAMILIES``.

A family is a folder ``models/<name>/`` whose ``__init__.py`` exposes ``FAMILY``, an instance of ``Family``. The
framework (command line, training loop, checkpoint loading, predict.py, tools, hubconf.py) only ever reaches a
family through these fields; nothing outside the folder tests a family's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["BuildResult", "Family"]

# (model, criterion, postprocessors): what every family's ``build`` returns.
BuildResult = tuple[nn.Module, nn.Module, dict[str, nn.Module]]


@dataclass(frozen=True)
class Family:
    """One detector family.

    Attributes:
        name: its ``--model`` value, e.g. "deformable_detr".
        title: its name in messages and docs, e.g. "Deformable DETR".
        settings: a dataclass whose fields are exactly the flags (argparse destinations) the family reads; the
            framework fills it from the parsed command line and hands it to ``build``. A flag that no field of
            the selected family names is refused when given explicitly (``cli.arguments``).
        build: ``build(settings, num_classes) -> (model, criterion, postprocessors)``.
        defaults: the family's published defaults of flags whose parser default differs (applied in one place,
            ``cli.arguments.apply_family_defaults``).
        default_num_classes: classifier size when neither ``--num_classes`` nor the dataset says otherwise
            (``dataset_file`` -> K, e.g. {"coco": 91, "coco_panoptic": 250}).
        owns_state_dict: True when a state dict (keys of the published code or this project's) is this family's;
            the families' predicates are mutually exclusive (``models.family_of_state_dict``).
        architecture: flag values a state dict implies (layer counts, widths, class count, switches); None where
            the weights do not say. Used to rebuild a model from a checkpoint without its stored flags.
        hub_recipes: torch.hub entry name -> the flag values of that published recipe (hubconf.py).
        weights_source: where the published weights of the hub recipes are, when torch.hub cannot download them
            (named in the error of ``pretrained=True`` without a local ``checkpoint``).
        refused_flags: flags of other families this one refuses with its own reason (flag destination -> the
            rest of the one-line error, e.g. "DINO is always two-stage; drop --two_stage").
        head_prefixes: name prefixes of the dataset-specific tensors (class heads, label embeddings, query
            embeddings): every tensor whose shape depends on the class or query count, and only those. Fine-tuning
            (``run.finetune``) lets exactly these differ in shape from the checkpoint and re-initialises them.
        keep_initial_heads: fine-tuning keeps the freshly built values of re-initialised heads instead of
            ``reset_parameters`` (their initialisation is special, e.g. the focal-loss prior of sigmoid heads).
        contiguous_labels: ``(settings) -> bool``; True: the classifier's labels are the indices 0..K-1 of the
            dataset's sorted category ids (K = their number), the framework remaps the dataset's labels (a
            ``datasets.rtdetr_transforms.CategoryMap`` handed to ``data_transforms``) and tells the 'bbox'
            postprocessor the ids to report (its ``set_category_ids(ids)``). None: labels are the category ids.
        data_transforms: ``(image_set, settings, category_map) -> transform`` of the family's own data pipeline
            (``transform(image, target) -> (tensor, target)``, optionally with ``set_epoch(epoch)``); None: the
            framework's (``datasets.coco.make_coco_transforms``). ``image_set`` 'train' or 'val'.
        batch_collate: ``(settings) -> collate_fn`` of the training batches (optionally with ``set_epoch``);
            None: the framework's padded collation.
    """

    name: str
    title: str
    settings: type
    build: Callable[[Any, int], BuildResult]
    owns_state_dict: Callable[[Mapping[str, Tensor]], bool]
    architecture: Callable[[Mapping[str, Tensor]], dict[str, Any]]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_num_classes: Mapping[str, int] = field(default_factory=lambda: {"coco": 91})
    hub_recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    weights_source: str = ""
    refused_flags: Mapping[str, str] = field(default_factory=dict)
    head_prefixes: tuple[str, ...] = ()
    keep_initial_heads: bool = False
    contiguous_labels: Callable[[Any], bool] | None = None
    data_transforms: Callable[[str, Any, Any], Callable] | None = None
    batch_collate: Callable[[Any], Callable] | None = None

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.settings):
            raise TypeError(f"Family {self.name}: settings must be a dataclass, got {self.settings!r}")

    @property
    def flags(self) -> frozenset[str]:
        """The argparse destinations this family reads (its settings' fields)."""
        return frozenset(f.name for f in dataclasses.fields(self.settings))

    def make_settings(self, values: Mapping[str, Any]) -> Any:
        """The family's settings from flag values (e.g. ``vars(args)``); flags it does not read are ignored.

        Raises:
            KeyError: naming the first flag the family reads that ``values`` lacks.
        """
        missing = sorted(self.flags - values.keys())
        if missing:
            raise KeyError(f"--model {self.name} reads --{missing[0]}, which the given settings lack")
        return self.settings(**{name: values[name] for name in self.flags})
