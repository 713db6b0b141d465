"""Typed, frozen specs: recipe steps, budgets, sweeps and the results they produce.

Every model is a pydantic v2 model with ``frozen=True`` and ``extra="forbid"``, so the same
classes validate YAML files, CLI options and the Prefect UI's parameter form.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shrinkflow.artifact import RUNTIMES
from shrinkflow.errors import SpecError
from shrinkflow.quantize import LAYER_TYPES, SCHEMES

Scheduler = Literal["constant", "step", "cosine", "onecycle"]
PruneMethod = Literal["magnitude-global", "magnitude-layer", "l1-structured", "l2-structured"]
#: The quantization schemes, runtimes and layer kinds are the keys of the core's registries
#: (shrinkflow.quantize.SCHEMES and LAYER_TYPES, shrinkflow.artifact.RUNTIMES): a scheme or runtime
#: is added there, once, and every choice below follows.
QuantScheme = Literal[tuple(SCHEMES)]
#: Where the shipped program runs: plain PyTorch (a torch.export program), or the ExecuTorch
#: runtime with its XNNPACK delegate (a .pte program: what phones and other edge CPUs run).
Runtime = Literal[tuple(RUNTIMES)]
#: Schemes whose quantized form only one runtime executes well.
RUNTIME_ONLY: dict[str, str] = {name: s.runtime for name, s in SCHEMES.items() if s.runtime}
#: Schemes the runtime's own tools apply when the program is packed (ONNX Runtime's quantizer):
#: nothing may follow them in a recipe.
PACK_TIME = frozenset(name for name, s in SCHEMES.items() if s.at_pack)
LayerKind = Literal[("all", *LAYER_TYPES)]
#: How the winner is chosen among the variants that fit (see shrinkflow.select).
Objective = Literal["best-quality", "smallest", "fastest", "lowest-energy"]
#: The device presets of shrinkflow.budget.DEVICES (a Literal, so forms render a dropdown).
DeviceName = Literal["mcu-nrf52840", "rpi4", "phone", "phone-entry", "jetson-orin-nano"]

#: The concrete layer kinds each scheme acts on (two quantize steps must not share one).
SCHEME_KINDS: dict[str, frozenset[str]] = {name: s.kinds for name, s in SCHEMES.items()}
#: The layer kinds a QuantSpec may name with each scheme ("all" means every kind it supports).
SCHEME_LAYERS: dict[str, frozenset[str]] = {name: kinds | {"all"} for name, kinds in SCHEME_KINDS.items()}


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# How Prefect's parameter form renders these models. JSON schema only: what validates is unchanged.


def optional_input(schema: dict) -> None:
    """Render ``X | None`` as a plain X input that may be left empty (None).

    Prefect's form shows ``anyOf [X, null]`` as a type switch reading 'Property is type "None"'; a plain X
    with no default is an input that may stay empty, and Prefect's server-side check accepts null for it
    (a nested model, a ``$ref``, is sent empty instead; its label is the model's title).
    """
    options = [option for option in schema.pop("anyOf", ()) if option.get("type") != "null"]
    if len(options) == 1:
        schema.update(options[0])
    if "default" in schema and schema["default"] is None:
        del schema["default"]


def step_picker(schema: dict) -> None:
    """Render a list of steps whose every item picks its kind from tabs and shows that kind's fields.

    Pydantic writes the discriminated union as ``oneOf`` + ``discriminator``; Prefect's form picks among
    ``anyOf`` members, and the ``if kind then <its schema>`` rules give errors on the bad field itself
    ("1.5 is greater than or equal to the maximum of 1" under Ratio), not only on the whole step.
    """
    items = schema["items"]
    mapping = items.pop("discriminator")["mapping"]
    items["anyOf"] = items.pop("oneOf")
    items["allOf"] = [{"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]}, "then": {"$ref": ref}}
                      for kind, ref in mapping.items()]


def step_form(title: str) -> Callable[[dict], None]:
    """A step model as one choice of the step picker: its tab's title and its kind as a one-option dropdown."""

    def extra(schema: dict) -> None:
        schema["title"] = title
        kind = schema["properties"]["kind"]
        kind |= {"title": "Technique", "enum": [kind["const"]]}

    return extra


class FinetuneSpec(Frozen):
    """Training after a destructive step: optimizer schedule and early stopping."""

    model_config = ConfigDict(json_schema_extra=step_form("Fine-tune"))

    kind: Literal["finetune"] = "finetune"
    epochs: int = Field(8, ge=0, le=500, description="Maximum epochs of fine-tuning.")
    lr: float = Field(1e-3, gt=0, le=1.0, title="Learning rate", description="Peak learning rate (AdamW).")
    scheduler: Scheduler = Field("cosine", description="Learning-rate schedule.")
    patience: int = Field(3, ge=1, le=100, description="Epochs without validation gain before stopping.")
    kd_alpha: float = Field(
        0.5, ge=0, le=1, title="Distillation weight (kd_alpha)",
        description="Weight of the distillation term from cached teacher outputs (0 = labels only)."
    )
    temperature: float = Field(4.0, gt=0, le=50, description="Softmax temperature of the distillation term.")
    samples_per_epoch: int | None = Field(
        None, ge=1, json_schema_extra=optional_input,
        description="Train each epoch on this many random samples (empty: the whole training split).")


class DistillSpec(Frozen):
    """Knowledge distillation into a smaller student built from the teacher's family."""

    model_config = ConfigDict(json_schema_extra=step_form("Distill"))

    kind: Literal["distill"] = "distill"
    width: float = Field(0.5, gt=0, le=1, title="Width (fraction of the teacher)",
                         description="Student width as a fraction of the teacher's.")
    depth: float = Field(1.0, gt=0, le=1, title="Depth (fraction of the teacher)",
                         description="Student depth as a fraction of the teacher's.")
    loss: Literal["kd", "mse", "cosine"] = Field(
        "kd", description="kd: Hinton KL on softened logits + hard-label CE; mse/cosine: on outputs (encoders)."
    )
    temperature: float = Field(4.0, gt=0, le=50, description="Softmax temperature T (KL is scaled by T^2).")
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the soft-target term; 1-alpha weights the labels.")
    epochs: int = Field(40, ge=1, le=1000, description="Maximum epochs.")
    lr: float = Field(3e-3, gt=0, le=1.0, title="Learning rate", description="Peak learning rate (AdamW).")
    scheduler: Scheduler = Field("onecycle", description="Learning-rate schedule.")
    patience: int = Field(8, ge=1, le=100, description="Epochs without validation gain before stopping.")
    samples_per_epoch: int | None = Field(
        None, ge=1, json_schema_extra=optional_input,
        description="Train each epoch on this many random samples (empty: the whole training split).")
    init: Literal["student", "parent"] = Field(
        "student", title="Student",
        description="student: the workload's student factory (a transformer without one: the teacher's layers, "
                    "spread evenly); parent: the model this step receives (the teacher, or what an earlier prune "
                    "step left), keeping 'depth' of its transformer layers with their weights (width 1.0).")
    layers: Literal["even", "important"] = Field(
        "even", title="Layers kept",
        description="Which transformer layers a student made of the teacher's (or parent's) layers keeps: even: spread "
                    "evenly, the last kept; important: those whose removal alone loses the most validation quality.")
    hidden: float = Field(
        0.0, ge=0, le=100, title="Hidden-state weight",
        description="Weight of hidden-state matching (transformers): each student layer's output, through a learned "
                    "projection, against its teacher layer's (MSE). 0 = off.")
    relations: float = Field(
        0.0, ge=0, le=100, title="Attention-relation weight",
        description="Weight of self-attention relation matching (MiniLMv2: Q-Q, K-K, V-V) between the student's last "
                    "layer and the teacher layer it maps to; head counts may differ. 0 = off.")
    relation_heads: int | None = Field(
        None, ge=1, le=256, json_schema_extra=optional_input, title="Relation heads",
        description="Relation heads (empty: the teacher's attention heads, if they divide both widths).")
    layer_map: tuple[int, ...] | None = Field(
        None, json_schema_extra=optional_input, title="Layer map",
        description="Teacher layer (0-based) that teaches each student layer (empty: spread evenly, the last to the last).")

    @model_validator(mode="before")
    @classmethod
    def _parent_keeps_its_width(cls, data):
        if isinstance(data, dict) and data.get("init") == "parent" and data.get("width") is None:
            data = {**data, "width": 1.0}  # the parent's layers keep their width: narrowing is a prune step's job
        return data

    @model_validator(mode="after")
    def _layer_map_only_with_layer_losses(self):
        if self.init == "parent" and self.width != 1.0:
            raise ValueError(f"width={self.width!r} with init='parent': expected 1.0 (the parent's layers keep their "
                             "width; narrow it with an l1-structured prune step before this one)")
        if self.layer_map is not None and not (self.hidden or self.relations):
            raise ValueError("layer_map is used only by the layer-wise losses; expected 'hidden' or 'relations' above 0")
        if self.layer_map is not None and any(i < 0 for i in self.layer_map):
            raise ValueError(f"layer_map={list(self.layer_map)!r}: expected teacher layer indices >= 0")
        return self


class PruneSpec(Frozen):
    """Pruning by importance, done once (or in iterations), then fine-tuned."""

    model_config = ConfigDict(json_schema_extra=step_form("Prune"))

    kind: Literal["prune"] = "prune"
    method: PruneMethod = Field(
        "magnitude-global",
        description="magnitude-*: unstructured weight zeroing; l1/l2-structured: removes channels, neurons, heads.",
    )
    ratio: float = Field(0.5, gt=0, lt=1, title="Ratio (0-1)", description="Fraction of weights (or channels) removed.")
    iterations: int = Field(1, ge=1, le=20, description="Prune in this many steps, fine-tuning between them.")
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec, title="Fine-tuning",
                                   description="Fine-tuning after each iteration.")


class QuantSpec(Frozen):
    """Quantization, global (every supported layer) or local (chosen layers)."""

    model_config = ConfigDict(json_schema_extra=step_form("Quantize"))

    kind: Literal["quantize"] = "quantize"
    scheme: QuantScheme = Field("int8-dynamic", description="Numeric format of the quantized layers.")
    layers: LayerKind = Field("all", title="Layer kind",
                              description="Layer types to quantize ('all' = every type the scheme supports).")
    include: tuple[str, ...] = Field((), description="Only layers whose name matches one of these globs (empty = all).")
    keep_float: tuple[str, ...] = Field((), title="Keep in float",
                                        description="Layers whose name matches one of these globs stay in fp32.")

    @model_validator(mode="after")
    def _layers_supported(self) -> QuantSpec:
        allowed = SCHEME_LAYERS[self.scheme]
        if self.layers not in allowed:
            msg = f"layers={self.layers!r} is not supported by scheme {self.scheme!r}; expected one of {sorted(allowed)}."
            raise ValueError(msg)
        return self

    @property
    def is_local(self) -> bool:
        return bool(self.include or self.keep_float) or self.layers != "all"


class VocabSpec(Frozen):
    """Vocabulary shrinking: keep only the token embeddings the training data uses (token models)."""

    model_config = ConfigDict(json_schema_extra=step_form("Vocabulary"))

    kind: Literal["vocab"] = "vocab"
    min_count: int = Field(1, ge=1, le=1000, description="Keep tokens seen at least this often in the training split.")


Step = Annotated[Union[DistillSpec, PruneSpec, FinetuneSpec, QuantSpec, VocabSpec], Field(discriminator="kind")]
_AFTER_QUANT_OK = {"quantize"}


class Recipe(Frozen):
    """An ordered chain of steps, e.g. distill -> prune -> finetune -> quantize."""

    name: str = Field(..., min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.+-]+$", description="Variant name.")
    steps: tuple[Step, ...] = Field(..., min_length=1, json_schema_extra=step_picker,
                                    description="Steps applied in order; pick each step's technique from its tabs.")
    runtime: Runtime = Field("torch", description="Runtime the shipped program is built for and measured on: 'torch' "
                             "(torch.export program), 'executorch' (.pte with the XNNPACK delegate) or 'onnx' "
                             "(an ONNX program for ONNX Runtime).")

    @model_validator(mode="after")
    def _quantize_is_last(self) -> Recipe:
        for i, step in enumerate(self.steps):
            needs = RUNTIME_ONLY.get(getattr(step, "scheme", ""))
            if needs and needs != self.runtime:
                raise ValueError(f"steps[{i}].scheme={step.scheme!r} runs only on runtime {needs!r}; expected "
                                 f"runtime={needs!r} (got {self.runtime!r}).")
            if getattr(step, "scheme", "") in PACK_TIME and i != len(self.steps) - 1:
                raise ValueError(f"steps[{i}].scheme={step.scheme!r} is applied when the program is packed; expected it "
                                 "as the recipe's last step.")
        seen_quant = False
        for i, step in enumerate(self.steps):
            if seen_quant and step.kind not in _AFTER_QUANT_OK:
                msg = f"steps[{i}].kind={step.kind!r} comes after a quantize step; expected quantize steps last."
                raise ValueError(msg)
            seen_quant = seen_quant or step.kind == "quantize"
        seen: dict[str, str] = {}
        for step in (s for s in self.steps if s.kind == "quantize"):
            for kind in SCHEME_KINDS[step.scheme] if step.layers == "all" else {step.layers}:
                if kind in seen:
                    msg = (f"steps quantize layer kind {kind!r} twice ({seen[kind]!r} and {step.scheme!r}); expected at "
                           "most one quantize step per layer kind (use include/keep_float).")
                    raise ValueError(msg)
                seen[kind] = step.scheme
        return self


class Budget(Frozen):
    """Limits a variant must meet on the target device. A limit left as None is not checked."""

    max_size_mb: float | None = Field(None, gt=0, title="Max size (MB)", json_schema_extra=optional_input,
                                      description="Deployable artifact size limit in MB (10^6 bytes).")
    max_latency_ms: float | None = Field(None, gt=0, title="Max latency (ms)", json_schema_extra=optional_input,
                                         description="p50 latency limit at batch 1, in ms.")
    max_peak_memory_mb: float | None = Field(None, gt=0, title="Max peak memory (MB)", json_schema_extra=optional_input,
                                             description="Peak inference memory limit in MB.")
    max_energy_mj: float | None = Field(None, gt=0, title="Max energy (mJ)", json_schema_extra=optional_input,
                                        description="Energy per inference limit in mJ.")
    max_quality_drop: float | None = Field(
        None, ge=0, title="Max quality drop (metric units)", json_schema_extra=optional_input,
        description="Largest allowed drop of the quality metric versus the teacher (metric units, e.g. 0.02 = 2 "
        "points of accuracy)."
    )
    # No default in the form: a form fills defaults in, and threads=1 would override the preset's threads.
    threads: int = Field(1, ge=1, le=256, title="Threads", json_schema_extra=lambda schema: schema.pop("default"),
                         description="CPU threads the device gives to inference.")


class SearchSpec(Frozen):
    """A budget-driven search: Optuna trials over students, pruning and quantization derived from the
    model and the budget (shrinkflow.search), instead of (or seeded by) hand-written recipes."""

    trials: int = Field(16, ge=1, le=1000, description="Trials measured, the teacher's post-training ones included (size-floor rejections do not count).")
    epochs: int | None = Field(None, ge=1, le=1000, json_schema_extra=optional_input, title="Distillation epochs per trial",
                               description="Distillation epochs per trial (empty: 60; early stopping and the pruner "
                               "cut trials short); fewer: a quicker, rougher search.")
    minutes: float | None = Field(None, gt=0, le=24 * 60, json_schema_extra=optional_input,
                                  description="Time budget in minutes, the sensitivity pass included: no batch of trials starts "
                                              "that the batches so far say would end past it (empty: no time limit).")
    parallel: int | None = Field(
        None, ge=1, le=256, json_schema_extra=optional_input,
        description="Trials per batch, run at once and told together (empty: twice the Dask workers; 1 on the "
        "threads runner). "
        "The trials and the winner are the same for the same seed and parallel.")
    sampler: Literal["tpe", "nsga2", "random"] = Field(
        "tpe", description="Optuna sampler: tpe (constrained TPE), nsga2 (constrained NSGA-II) or random. tpe and "
        "nsga2 start from a ladder of students bisected for the smallest that holds; random has no start.")
    prune_trials: bool = Field(
        True, description="Stop a trial whose validation quality falls behind while it trains (Optuna pruner).")
    runtime: Runtime | None = Field(None, json_schema_extra=optional_input,
                                    description="Search only programs for this runtime: torch or executorch (empty: "
                                    "both, where the device runs them; onnx variants are recipes).")


class SweepSpec(Frozen):
    """One sweep: a workload, a target device, and the recipes to try."""

    name: str = Field("shrinkflow", min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.-]+$")
    workload: str = Field("digits", description="Built-in workload name, a factory 'package.module:function', or "
                          "'hf:PATH': a Hugging Face model directory (with task and data).")
    task: Literal["sequence-classification", "sentence-embedding"] | None = Field(
        None, json_schema_extra=optional_input, description="For an 'hf:PATH' workload: what the model does.")
    data: str | None = Field(
        None, min_length=1, json_schema_extra=optional_input,
        description="For an 'hf:PATH' workload: a .csv, .tsv or .jsonl file with a 'text' column ('label' for "
        "classification, optional 'split'), or a .txt file of one text per line (sentence-embedding).")
    max_length: int | None = Field(
        None, ge=1, le=65536, json_schema_extra=optional_input,
        description="Tokens per text for workloads that tokenize (minilm, hf:PATH); empty: the model's own limit.")
    device: DeviceName = Field("mcu-nrf52840", description="Device preset (see `shrinkflow devices`).")
    budget: Budget | None = Field(
        None, json_schema_extra=optional_input,
        description="Limits that override the device preset's, field by field (empty fields: the preset's).")
    recipes: tuple[Recipe, ...] | None = Field(
        None, title="Recipes", json_schema_extra=optional_input,
        description="Recipes to try, each a chain of steps (none: a search). With a search, they seed it.")
    search: SearchSpec | None = Field(
        None, json_schema_extra=optional_input,
        description="Search under the budget: with no recipes, always (these settings or the defaults); with "
        "recipes, when a field here is changed from its default (the recipes then seed it).")
    workload_recipes: bool = Field(
        False, description="Run the workload's own hand-written recipe list (built-in workloads) instead of searching.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for data splits, training and initialisation.")
    registry_name: str | None = Field(
        None, max_length=120, pattern=r"^[A-Za-z0-9_.-]+$", json_schema_extra=optional_input,
        description="MLflow registered model name (default: '<workload>-<device>').")
    runner: Literal["dask", "threads"] = Field(
        default_factory=lambda: "dask" if (os.cpu_count() or 1) > 1 else "threads",
        description="dask: variants on Dask worker processes (a LocalCluster, or the cluster at dask_address); "
        "threads: one variant at a time in-process, for debugging (torch.export patches global state, so torch "
        "work cannot share a process concurrently).")
    workers: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1), ge=1, le=256,
        description="Dask worker processes of the local cluster (each trains on 1 thread and measures on "
        "cores // max(workers, 2) threads; empty: one per core of the machine that runs the flow).")
    dask_address: str | None = Field(
        None, pattern=r"^(tcp|tls|inproc|ucx)://\S+$", json_schema_extra=optional_input,
        description="Join an existing Dask cluster (e.g. tcp://scheduler:8786) instead of starting a local one.")
    objective: Objective = Field(
        "best-quality",
        description="How the winner is picked among the variants that fit: best-quality (the highest quality; "
        "variants within quality_tolerance of it tie, and the smallest of those wins), smallest (size, then quality), "
        "fastest (p50 latency, then size), lowest-energy (energy per inference, then size).")
    quality_tolerance: float = Field(
        0.005, ge=0, le=1,
        description="Quality differences up to this much (metric units) count as ties under best-quality: "
        "0.005 is half a point of accuracy, about two samples of the digits test split.")

    @model_validator(mode="after")
    def _unique_recipe_names(self) -> SweepSpec:
        names = [r.name for r in self.recipes or ()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"recipes has duplicate names {dupes!r}; expected unique names.")
        return self

    @model_validator(mode="before")
    @classmethod
    def _absolute_paths(cls, values):
        """An hf directory and a data file are made absolute where the spec is read: the workers
        load them, and may run elsewhere in the file system (same host or a shared one)."""
        if isinstance(values, dict):
            values = dict(values)
            workload, data = values.get("workload"), values.get("data")
            if isinstance(workload, str) and workload.startswith("hf:") and len(workload) > 3:
                values["workload"] = "hf:" + os.path.abspath(os.path.expanduser(workload[3:]))
            if isinstance(data, str) and data:
                values["data"] = os.path.abspath(os.path.expanduser(data))
        return values

    @model_validator(mode="after")
    def _hf_needs_task_and_data(self) -> SweepSpec:
        if self.workload.startswith("hf:"):
            if self.workload == "hf:":
                raise ValueError("workload='hf:' names no directory; expected 'hf:PATH', a directory written by save_pretrained.")
            if self.task is None or self.data is None:
                missing = "task" if self.task is None else "data"
                raise ValueError(f"workload={self.workload!r} needs '{missing}' (--{missing}); expected task "
                                 "sequence-classification or sentence-embedding and a data file of texts.")
        elif self.task is not None or self.data is not None:
            raise ValueError(f"task / data are set for workload {self.workload!r}; expected them only with an 'hf:PATH' workload.")
        return self

    def workload_args(self) -> dict:
        """What loads the workload: ``shrinkflow.workloads.load(**spec.workload_args())``."""
        return {"ref": self.workload, "seed": self.seed, "task": self.task, "data": self.data, "max_length": self.max_length}

    @model_validator(mode="after")
    def _one_source(self) -> SweepSpec:
        if self.workload_recipes and (self.recipes or (self.search is not None and self.search.model_fields_set)):
            raise ValueError("workload_recipes=true runs the workload's own list; expected no recipes and no search with it.")
        return self

    @property
    def searching(self) -> bool:
        """Whether this sweep searches: nothing else was given, or ``search`` sets a field to something
        other than its default. (A form sends an untouched section as ``{}`` or with every default
        filled in, as the Prefect UI does: beside recipes, both mean recipes only.)"""
        if not (self.recipes or self.workload_recipes):
            return True
        if self.search is None:
            return False
        defaults = SearchSpec()
        return any(getattr(self.search, f) != getattr(defaults, f) for f in self.search.model_fields_set)

    def search_or_default(self) -> SearchSpec:
        return self.search or SearchSpec()

    def model_name(self, workload_name: str) -> str:
        """The registered model: ``registry_name``, else '<workload>-<device>'."""
        return self.registry_name or f"{workload_name}-{self.device}"

    def spec_hash(self) -> str:
        """A short content hash of the spec, stable across processes."""
        what = self.model_dump(mode="json", exclude={"runner", "workers", "dask_address"})  # what, not how
        blob = json.dumps(what, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def parse(model: type[Frozen], data: object) -> Frozen:
    """Validate ``data`` into ``model``, turning pydantic errors into one-line SpecErrors."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise spec_error_from(exc) from None


def spec_error_from(exc: ValidationError) -> SpecError:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    got = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("extra_forbidden",):
        return SpecError(f"Unknown field {field!r}; remove it or check its spelling.")
    return SpecError(f"Invalid value {got!r} for field {field!r}: {msg}")


def flatten(data: object, prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts/lists into dotted keys (for MLflow params and tags)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = str(data)
    return out


# ---------------------------------------------------------------- results


class Report(Frozen):
    """What `measure` found for one model. The same fields for the teacher and every variant."""

    quality: float | None = None
    size_bytes: int = Field(..., description="Size of the deployable artifact as shipped (compressed).")
    raw_size_bytes: int = Field(..., description="Size of the serialized program before compression.")
    params: int
    nonzero_params: int
    sparsity: float
    macs: int
    latency_p50_ms: float = Field(..., description="p50 latency at batch 1, normalised to an unloaded host (see measure.timed).")
    latency_p95_ms: float
    latency_ci_ms: tuple[float, float] | None = Field(
        None, description="95% confidence interval of latency_p50_ms (order statistics of the timed calls).")
    latency_runs: int = Field(0, description="Timed calls behind the latency figures.")
    latency_raw_p50_ms: float | None = Field(None, description="p50 wall time as timed, before normalisation.")
    reference_ms: float | None = Field(
        None, description="p50 of the reference kernel, timed interleaved with the model (the load it ran under).")
    quiet_reference_ms: float | None = Field(
        None, description="The host's quiet reference time the latency figures are scaled to (measure.quiet_reference_ms).")
    peak_memory_bytes: int
    energy_mj: float
    energy_source: Literal["measured-rapl", "estimated"]
    threads: int
    artifact_format: Literal["torch.export", "torchscript", "executorch", "onnx"]
    extra: dict[str, float] = Field(
        default_factory=dict, description="Workload-specific metrics on the test split (e.g. spearman), by name.")


class Miss(Frozen):
    limit: str
    value: float
    allowed: float
    worst_set: str | None = Field(None, description="For max_quality_drop: the evaluation set with the largest drop, "
                                  "'test' (in-domain) or 'ood:<name>' (an out-of-domain set).")

    @property
    def label(self) -> str:
        """The limit, with the set that broke it when that is an out-of-domain one."""
        return f"{self.limit} ({self.worst_set})" if self.worst_set and self.worst_set != "test" else self.limit

    @property
    def excess(self) -> float:
        """How far past the limit, as a fraction of it (0.25 = 25% over)."""
        return (self.value - self.allowed) / self.allowed if self.allowed else float("inf")


class Verdict(Frozen):
    fits: bool
    misses: tuple[Miss, ...] = ()


class VariantResult(Frozen):
    """The small record a variant produces: never a model or a tensor."""

    name: str
    recipe: Recipe | None = None
    report: Report | None = None
    verdict: Verdict | None = None
    skipped: str | None = Field(None, description="Why the variant was not trained, if it was skipped.")
    seconds: float = 0.0
    artifact_uri: str | None = Field(None, description="The deployable file, as an MLflow runs:/ URI.")
    model_uri: str | None = Field(None, description="The MLflow model logged for this variant.")
    tracking_seconds: float = Field(0.0, description="Time spent logging this variant to MLflow.")
    tracking_retries: int = Field(0, ge=0, description="Transient tracking errors (a locked database, an unreachable "
                                  "server) retried while recording this variant.")
    cache_hit: bool = Field(False, description="Reused from an earlier run of the same recipe, teacher and data.")
    run_id: str | None = None

    @property
    def fits(self) -> bool:
        return bool(self.verdict and self.verdict.fits)


class Selection(Frozen):
    winner: str | None
    rule: str = Field("", description="The selection rule, in words, as applied.")
    runner_up: str | None = Field(None, description="The variant the rule ranked second among those that fit.")
    why: str = Field("", description="Why the winner beat the runner-up, in one sentence.")
    fitting: tuple[str, ...]
    pareto_size: tuple[str, ...]
    pareto_latency: tuple[str, ...]
    nearest_misses: tuple[str, ...]


class TeacherInfo(Frozen):
    """What the teacher task hands the flow: its baseline record and the recipes to fan out."""

    baseline: VariantResult
    workload_name: str
    outputs_key: str
    forward_samples: int
    recipes: tuple[Recipe, ...]
    skipped: dict[str, str] = Field(default_factory=dict, description="Recipes not worth training, with why.")


class SweepResult(Frozen):
    name: str
    device: str
    budget: Budget
    teacher: VariantResult
    variants: tuple[VariantResult, ...]
    selection: Selection
    teacher_forward_samples: int = 0
