"""Head importance: Michel et al.'s gradient importance and ablation drops (ViT partial pruning: pruning.py).

All three run the model through the headlab attention function (`intervene`) on a task's examples and
return tidy frames keyed by (tower, layer, head). Shapes: head outputs z [batch, head, q, d_head] (before
o_proj), token gates [batch, head, q].

1. Michel, Levy, Neubig 2019 ("Are Sixteen Heads Really Better than One?"). Each head output is gated,
   z_h <- xi_h z_h with xi = 1, and importance is I_h = E_x |dL(x)/dxi_h|, with, by the chain rule,
   dL/dxi_h = sum_t <z_h,t, dL/dz_h,t>. headlab puts ONE gate per (example, head, query token) on the head
   outputs (`HeadGates`; all ones, so the model is unchanged), which gives every per-token term at once:
   - variant "token" (the paper's code, `calculate_head_importance`): sum over tokens and examples of
     |<z_h,t, dL/dz_h,t>|, divided by the number of real tokens;
   - variant "example" (the formula as printed): sum over examples of |sum_t <.,.>|, divided by the
     number of real tokens;
   - variant "batch" (HF bertology): per batch of `batch_size` examples, |gradient of the batch's summed
     loss|, summed over batches and divided by the number of real tokens (HF uses the batch-mean loss:
     a factor 1 / batch size, the same for every head).
   By the triangle inequality token >= example >= batch, head by head.
   Layer normalisation (default on, as the paper's pruning): I_l,h <- I_l,h / (||I_l,:||_2 + 1e-20).
   Not reproduced: the code's division of the last layer by the number of examples instead of tokens, and
   the HF script's global min-max rescaling (apply it for display).
   Loss L: next-token cross-entropy of the answer's first token after the prompt ("answer"), or the mean
   next-token cross-entropy over every token of prompt + answer ("lm"); for ViT classifiers, the binary
   cross-entropy of the multi-label logits (mean over labels, as the model's own loss). Losses are summed
   over the examples of a batch, so each example's gradient is its own.

2. Ablation drops (lvlm.md 6.2's DeltaAcc / DeltaConf / DeltaLoss; llm.md 6.3's ablation kinds): ablate one
   head with `HeadAblation` (zero; mean = the head's mean output over every token of a reference set, the
   same task drawn with seed + 1; resample = the head's output on the task's corrupted prompts, aligned row
   by row) and report acc_drop = acc(clean) - acc(ablated), conf_drop (probability of the correct answer)
   and loss_increase = loss(ablated) - loss(clean). LM accuracy is top-1 over the whole vocabulary on the
   answer's first token; ViT accuracy is per-label accuracy and the confidence the probability given to
   each label's true value (p if present, 1 - p if absent).

3. ViT partial pruning: headlab.analyses.pruning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch.nn import functional as F

from headlab.analyses.registry import Analysis, Option, store_model
from headlab.datasets import scenes, synthetic
from headlab.errors import InputError, SelectionError, UnsupportedModelError
from headlab.interventions.core import AttentionCall, Intervention, Patch, intervene
from headlab.interventions.heads import HeadAblation, HeadScale, head_outputs
from headlab.loading import Family, LoadedModel
from headlab.runs import distributed
from headlab.store import Store

Head = tuple[int, int]  # (layer, head)
VARIANTS = ("token", "example", "batch")
ABLATIONS = ("zero", "mean", "resample")
LOSSES = ("answer", "lm")
VIT_TASK = "scenes"

# ------------------------------------------------------------------------------------------ task data


@dataclass(frozen=True)
class TaskData:
    """A task's examples as model inputs. LM tasks: `target` [batch] answer token ids read at `last`
    [batch] (the last real prompt token); ViT: `target` [batch, labels] multi-hot. `corrupted`: the
    corrupted prompts' inputs (resample ablation), or None. With loss="lm", `inputs` hold prompt + answer
    and `target` is unused."""

    tower: str
    inputs: dict
    target: torch.Tensor
    last: torch.Tensor | None = None
    corrupted: dict | None = None
    loss: str = "answer"

    @property
    def n(self) -> int:
        return len(self.target)

    def rows(self, start: int, stop: int) -> TaskData:
        def cut(enc):
            return None if enc is None else {k: v[start:stop] for k, v in enc.items()}

        last = None if self.last is None else self.last[start:stop]
        return replace(
            self,
            inputs=cut(self.inputs),
            target=self.target[start:stop],
            last=last,
            corrupted=cut(self.corrupted),
        )

    def chunks(self, batch_size: int) -> Iterator[TaskData]:
        if batch_size < 1:
            raise SelectionError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, self.n, batch_size):
            yield self.rows(start, min(self.n, start + batch_size))


def task_data(
    lm: LoadedModel, task: str = "auto", *, n: int = 64, seed: int = 0, loss: str = "answer"
) -> TaskData:
    """`n` examples of `task` for `lm`: a synthetic text task (headlab.datasets.synthetic) for LLMs, or
    "scenes" (synthetic scenes, multi-label) for ViT classifiers; "auto" picks induction or scenes."""
    if n < 1:
        raise SelectionError(f"n must be at least 1, got {n}")
    if loss not in LOSSES:
        raise SelectionError(f"loss must be one of {LOSSES}, got {loss!r}")
    if lm.family is Family.VIT:
        if task not in ("auto", VIT_TASK):
            raise SelectionError(
                f"{lm.model_type} is an image classifier: its task is {VIT_TASK!r}, not {task!r}"
            )
        return _scene_data(lm, n, seed)
    if lm.family is not Family.LLM or lm.tokenizer is None:
        raise UnsupportedModelError(
            f"head importance runs on text LLMs with a tokenizer and ViT classifiers, not {lm.model_type}"
        )
    task = "induction" if task == "auto" else task
    if task not in synthetic.TASKS:
        raise SelectionError(f"no task named {task!r}; choose one of {sorted(synthetic.TASKS)} or 'auto'")
    examples = synthetic.TASKS[task](n, seed=seed)
    tok = lm.tokenizer
    if tok.pad_token_id is None:
        raise UnsupportedModelError(
            f"the tokenizer of {lm.model_type} has no pad token to batch prompts with"
        )
    if loss == "lm":
        enc = dict(tok([e.prompt + e.answer for e in examples], return_tensors="pt", padding=True))
        return TaskData("lm", enc, torch.zeros(n, dtype=torch.long), None, None, loss)
    enc = dict(tok([e.prompt for e in examples], return_tensors="pt", padding=True))
    mask = enc["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # the last real token, either padding side
    target = torch.tensor([_first_token(tok, e.answer) for e in examples])
    corrupted = None
    if all(e.corrupted is not None for e in examples):
        corrupted = dict(tok([e.corrupted for e in examples], return_tensors="pt", padding=True))
    return TaskData("lm", enc, target, last, corrupted, loss)


def _first_token(tokenizer, answer: str) -> int:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"the answer {answer!r} encodes to no token")
    return ids[0]


def _scene_data(lm: LoadedModel, n: int, seed: int) -> TaskData:
    if lm.processor is None or not hasattr(lm.model.config, "label2id"):
        raise UnsupportedModelError(f"{lm.model_type} needs an image processor and a classification head")
    labels = sorted(lm.model.config.label2id, key=lm.model.config.label2id.get)
    if set(labels) != set(scenes.CATEGORIES):
        raise UnsupportedModelError(
            f"the classifier's labels {labels} are not the scene categories {sorted(scenes.CATEGORIES)}"
        )
    scene_list = scenes.make_scenes(n, seed=seed, start_id=300_000 + 10_000 * seed)
    pixels = lm.processor([scenes.render(s) for s in scene_list], return_tensors="pt")["pixel_values"]
    target = torch.zeros(n, len(labels))
    for i, s in enumerate(scene_list):
        for obj in s.objects:
            target[i, labels.index(obj)] = 1.0
    # resample source: each image's head outputs come from the previous image of the set
    return TaskData("vision", {"pixel_values": pixels}, target, corrupted={"pixel_values": pixels.roll(1, 0)})


# ------------------------------------------------------------------------------------------ scoring


def _logits(lm: LoadedModel, inputs: dict) -> torch.Tensor:
    return lm.model(**inputs).logits.float()


def example_losses(data: TaskData, logits: torch.Tensor) -> torch.Tensor:
    """[batch] loss of each example (differentiable): see the module docstring for each task kind."""
    if data.tower == "vision":
        return F.binary_cross_entropy_with_logits(logits, data.target, reduction="none").mean(-1)
    if data.loss == "lm":
        ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # [b, n - 1]
        real = (mask[:, 1:] * mask[:, :-1]).float()
        return (nll * real).sum(-1) / real.sum(-1).clamp(min=1)
    final = logits[torch.arange(data.n), data.last]  # [b, vocab]
    return F.cross_entropy(final, data.target, reduction="none")


def example_metrics(data: TaskData, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """{loss, correct, confidence}: [batch] each (correct and confidence as floats in [0, 1])."""
    logits = logits.detach()
    loss = example_losses(data, logits)
    if data.tower == "vision":
        p = logits.sigmoid()
        truth = data.target.bool()
        correct = ((logits > 0) == truth).float().mean(-1)
        return {"loss": loss, "correct": correct, "confidence": torch.where(truth, p, 1 - p).mean(-1)}
    if data.loss == "lm":
        ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
        real = (mask[:, 1:] * mask[:, :-1]).float()
        probs = logits[:, :-1].softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        hits = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float()
        count = real.sum(-1).clamp(min=1)
        return {
            "loss": loss,
            "correct": (hits * real).sum(-1) / count,
            "confidence": (probs * real).sum(-1) / count,
        }
    final = logits[torch.arange(data.n), data.last]
    confidence = final.softmax(-1)[torch.arange(data.n), data.target]
    return {"loss": loss, "correct": (final.argmax(-1) == data.target).float(), "confidence": confidence}


@torch.no_grad()
def _evaluate(lm: LoadedModel, data: TaskData, batch_size: int, make=None, clean=None) -> dict:
    """Mean loss / accuracy / confidence over `data`; `make(chunk)` -> interventions for that chunk (none:
    a no-op HeadScale, so clean runs go through the same headlab attention as edited ones). With
    `clean` (an earlier result), also logit_shift: the mean |logit - clean logit| over the scored logits
    (the answer position's vocabulary row, or every label), sensitive where a model is saturated."""
    sums = {"loss": 0.0, "correct": 0.0, "confidence": 0.0}
    scored = []
    for chunk in data.chunks(batch_size):
        noop = (HeadScale(((0, 0),), 1.0, tower=chunk.tower),)
        with intervene(lm, *(make(chunk) if make is not None else noop)):
            logits = _logits(lm, chunk.inputs)
        for key, value in example_metrics(chunk, logits).items():
            sums[key] += float(value.sum())
        scored.append(logits if chunk.last is None else logits[torch.arange(chunk.n), chunk.last])
    out = {"loss": sums["loss"] / data.n, "accuracy": sums["correct"] / data.n}
    out["confidence"] = sums["confidence"] / data.n
    if clean is not None:
        previous = clean["_scored"]
        out["logit_shift"] = float(
            torch.cat([(a - b).abs().mean(-1) for a, b in zip(scored, previous, strict=True)]).mean()
        )
    out["_scored"] = scored
    return out


def _drops(clean: dict, ablated: dict) -> dict:
    public = {k: v for k, v in ablated.items() if not k.startswith("_")}
    return {
        **public,
        "acc_drop": clean["accuracy"] - ablated["accuracy"],
        "conf_drop": clean["confidence"] - ablated["confidence"],
        "loss_increase": ablated["loss"] - clean["loss"],
    }


# ------------------------------------------------------------------------------------------ gradient importance


class _GatePatch(Patch):
    def __init__(self, tower: str, values: torch.Tensor) -> None:
        self.tower, self.values = tower, values
        self.token_gates: dict[int, torch.Tensor] = {}  # layer -> [b, h, q] leaf gates
        self.real: dict[int, torch.Tensor] = {}  # layer -> [b, q] bool: the query is a real token

    def transform(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if call.layer in self.token_gates:
            raise SelectionError("HeadGates serve one forward pass; open a new intervene() for the next")
        token = torch.ones(
            out.shape[:3], dtype=out.dtype, device=out.device, requires_grad=torch.is_grad_enabled()
        )
        self.token_gates[call.layer] = token
        self.real[call.layer] = (call.query_pos >= 0).to(out.device)
        head = self.values[call.layer].to(out)  # [h]
        return out * (head[None, :, None] * token)[..., None]


@dataclass(frozen=True, eq=False)
class HeadGates(Intervention):
    """Michel et al.'s gates: every head output of `tower` is multiplied by `values[layer, head]` (default
    all ones: the model is unchanged) and by a per-token leaf gate of ones [batch, head, q] created on each
    attention call (`patch.token_gates[layer]`). With gates at 1, the gradient of a loss w.r.t. the token
    gate (b, h, t) is <z_h,t, dL/dz_h,t>, and summed over (b, t) it is dL/dxi_h; `values` may itself
    require grad (then its gradient is the same sum). One forward pass per `intervene` block."""

    values: torch.Tensor | None = None  # [n_layers, n_heads]
    tower: str = "lm"

    def bind(self, lm: LoadedModel) -> Patch:
        info = lm.tower(self.tower)
        values = self.values if self.values is not None else torch.ones(info.n_layers, info.n_heads)
        if tuple(values.shape) != (info.n_layers, info.n_heads):
            raise SelectionError(
                f"gate values have shape {tuple(values.shape)}; the {self.tower} tower needs "
                f"({info.n_layers}, {info.n_heads})"
            )
        return _GatePatch(self.tower, values)


def token_gate_gradients(lm: LoadedModel, data: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    """(grads [n_layers, batch, head, q], real [batch, q]) for ONE batch: d(sum of the example losses) /
    d(token gate), i.e. <z_h,t, dL(x_b)/dz_h,t>, at gates 1. Padding queries get 0."""
    gates = HeadGates(tower=data.tower)
    with torch.enable_grad(), intervene(lm, gates) as runner:
        loss = example_losses(data, _logits(lm, data.inputs)).sum()
        patch = runner.patches[0]
        layers = sorted(patch.token_gates)
        if layers != list(range(lm.tower(data.tower).n_layers)):
            raise UnsupportedModelError(f"the gates saw layers {layers} of the {data.tower} tower, not all")
        grads = torch.autograd.grad(loss, [patch.token_gates[layer] for layer in layers], allow_unused=True)
    real = patch.real[0]
    stacked = torch.stack(
        [
            torch.zeros_like(patch.token_gates[i]) if g is None else g
            for i, g in zip(layers, grads, strict=True)
        ]
    )
    return stacked * real[None, :, None, :], real


def layer_normalize(scores: torch.Tensor) -> torch.Tensor:
    """[n_layers, n_heads] -> each layer divided by its L2 norm (+ 1e-20), as Michel et al.'s pruning."""
    return scores / (scores.norm(dim=-1, keepdim=True) + 1e-20)


def gradient_importance(
    lm: LoadedModel,
    data: TaskData,
    *,
    variant: str = "token",
    normalize: bool = True,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Michel et al.'s head importance (module docstring, part 1) over `data`.

    Columns: tower, layer, head, importance (layer-normalised when `normalize`), raw (before
    normalisation), first_order_loss_increase (-mean over examples of dL(x)/dxi_h: the signed Taylor
    estimate of L(xi_h = 0) - L(xi_h = 1), which |.| discards: a head whose removal LOWERS the loss is
    also "important" to Michel et al.), rank (1 = most important, over all heads by `importance`)."""
    if variant not in VARIANTS:
        raise SelectionError(f"variant must be one of {VARIANTS}, got {variant!r}")
    info = lm.tower(data.tower)
    total = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)
    signed = torch.zeros_like(total)
    tokens = 0
    for chunk in data.chunks(batch_size):
        grads, real = token_gate_gradients(lm, chunk)  # [L, b, h, q], [b, q]
        grads = grads.double()
        tokens += int(real.sum())
        signed += grads.sum((1, 3))
        if variant == "token":
            total += grads.abs().sum((1, 3))
        elif variant == "example":
            total += grads.sum(3).abs().sum(1)
        else:
            total += grads.sum((1, 3)).abs()
    raw = total / max(tokens, 1)
    scores = layer_normalize(raw) if normalize else raw
    columns = {"importance": scores, "raw": raw, "first_order_loss_increase": -signed / data.n}
    return _head_frame(info.name, columns, rank_by="importance")


def _head_frame(tower: str, columns: dict[str, torch.Tensor], *, rank_by: str) -> pd.DataFrame:
    n_layers, n_heads = columns[rank_by].shape
    rows = [
        {
            "tower": tower,
            "layer": layer,
            "head": head,
            **{k: float(v[layer, head]) for k, v in columns.items()},
        }
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    frame = pd.DataFrame(rows)
    frame["rank"] = frame[rank_by].rank(ascending=False, method="first").astype(int)
    return frame


# ------------------------------------------------------------------------------------------ ablation drops


def _all_heads(lm: LoadedModel, tower: str) -> list[Head]:
    info = lm.tower(tower)
    return [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]


def _real_tokens(inputs: dict, z: torch.Tensor) -> torch.Tensor:
    """[batch, n_tokens] bool: the example positions of `z` [batch, n_tokens, d] that hold real tokens."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.ones(z.shape[:2], dtype=torch.bool)
    return torch.arange(z.shape[1])[None] < mask.sum(-1)[:, None]


def reference_means(
    lm: LoadedModel, reference: TaskData, heads: Sequence[Head], *, batch_size: int = 32
) -> dict[Head, torch.Tensor]:
    """{head: [d_head]} each head's output averaged over every real token of `reference` (all batches)."""
    sums: dict[Head, torch.Tensor] = {}
    count = 0
    for chunk in reference.chunks(batch_size):
        outs = head_outputs(lm, chunk.inputs, heads, tower=reference.tower)
        real = None
        for head, z in outs.items():  # [b, n_tokens, d]
            real = _real_tokens(chunk.inputs, z) if real is None else real
            sums[head] = sums.get(head, 0) + z[real].sum(0)
        count += int(real.sum())
    return {head: total / count for head, total in sums.items()}


def ablation_importance(
    lm: LoadedModel,
    data: TaskData,
    *,
    kind: str = "zero",
    heads: Sequence[Head] | None = None,
    reference: TaskData | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Per-head drops when ONE head is ablated with `HeadAblation(kind)` (module docstring, part 2).

    mean: needs `reference` (the task's examples the means are taken over); resample: needs `data` with
    corrupted inputs (row-aligned with the clean ones). Columns: tower, layer, head, kind, accuracy,
    confidence, loss (ablated), logit_shift, acc_drop, conf_drop, loss_increase, rank (1 = largest loss
    increase). Under torchrun each process ablates its share of the heads (`runs.distributed`) and every
    process gets all rows."""
    if kind not in ABLATIONS:
        raise SelectionError(f"ablation kind must be one of {ABLATIONS}, got {kind!r}")
    if data.loss != "answer" and data.tower != "vision":
        raise SelectionError("ablation drops score the answer token: build the task data with loss='answer'")
    heads = list(heads) if heads is not None else _all_heads(lm, data.tower)
    means: dict[Head, torch.Tensor] = {}
    if kind == "mean":
        if reference is None:
            raise InputError("mean ablation needs a reference set (reference=task_data(..., seed=other))")
        means = reference_means(lm, reference, heads, batch_size=batch_size)
    if kind == "resample" and data.corrupted is None:
        raise InputError(
            "resample ablation needs corrupted prompts; tasks with them: "
            f"{sorted(t for t in synthetic.TASKS if synthetic.TASKS[t](1)[0].corrupted is not None)}"
        )
    clean = _evaluate(lm, data, batch_size)
    world, done = distributed.current(), []
    for i, head in world.sweep(heads):  # data parallel: each rank ablates its share of the heads

        def make(chunk: TaskData, head=head):
            source = {}
            if kind == "resample":
                source = head_outputs(lm, chunk.corrupted, [head], tower=chunk.tower)
            return (HeadAblation((head,), kind, means=means, source=source, tower=chunk.tower),)

        ablated = _evaluate(lm, data, batch_size, make, clean)
        done.append(
            (
                i,
                {
                    "tower": data.tower,
                    "layer": head[0],
                    "head": head[1],
                    "kind": kind,
                    **_drops(clean, ablated),
                },
            )
        )
    frame = pd.DataFrame(world.collect(done))
    frame["rank"] = frame["loss_increase"].rank(ascending=False, method="first").astype(int)
    return frame


# ------------------------------------------------------------------------------------------ analyses


def _task_options(options: dict) -> dict:
    return {"task": options["task"], "n": options["n"], "seed": options["seed"]}


def _run_gradient(store: Store, options: dict) -> pd.DataFrame:
    lm = store_model(store)
    data = task_data(lm, **_task_options(options), loss=options["loss"])
    return gradient_importance(
        lm, data, variant=options["variant"], normalize=options["normalize"], batch_size=options["batch_size"]
    )


def _run_ablation(store: Store, options: dict) -> pd.DataFrame:
    lm = store_model(store)
    task = _task_options(options)
    data = task_data(lm, **task)
    reference = task_data(lm, **{**task, "seed": task["seed"] + 1}) if options["kind"] == "mean" else None
    return ablation_importance(
        lm, data, kind=options["kind"], reference=reference, batch_size=options["batch_size"]
    )


_COMMON = {
    "task": Option(
        type=str,
        default="auto",
        choices=("auto", *sorted(synthetic.TASKS), VIT_TASK),
        help="auto: induction for LLMs, scenes for ViTs",
    ),
    "n": Option(type=int, default=64, ge=1, help="number of examples"),
    "seed": Option(
        type=int,
        default=0,
        ge=0,
        help="seed of the task's generator (mean ablation's reference set uses seed + 1)",
    ),
    "batch_size": Option(type=int, default=32, ge=1, help="examples per forward pass"),
}

ANALYSES: dict[str, Analysis] = {
    "importance-gradient": Analysis(
        name="importance-gradient",
        description="Michel et al. 2019 head importance E|dL/dxi_h| from gates on the head outputs",
        run=_run_gradient,
        options={
            **_COMMON,
            "variant": Option(
                type=str,
                default="token",
                choices=VARIANTS,
                help="|.| per token (paper code), per example, per batch (HF)",
            ),
            "normalize": Option(
                type=bool, default=True, help="divide each layer by its L2 norm (Michel et al.)"
            ),
            "loss": Option(
                type=str,
                default="answer",
                choices=LOSSES,
                help="answer: cross-entropy of the answer token; lm: next-token loss on prompt + answer",
            ),
        },
    ),
    "importance-ablation": Analysis(
        name="importance-ablation",
        description="accuracy / confidence / loss change when one head is ablated (zero, mean or resample)",
        run=_run_ablation,
        options={**_COMMON, "kind": Option(type=str, default="zero", choices=ABLATIONS, help="the ablation")},
    ),
}
