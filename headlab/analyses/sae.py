"""Discrete-SAE circuit identification (O'Neill & Bui 2024, arXiv 2405.12522; repo charlieoneill11/sae-circuits).

The node-level method, as in the official code (see shared/methods/llm.md, section 4):

1. Representation: for every example and head, the head's output written to the residual stream,
   z_h . W_O^h [d_model], averaged over the example's real token positions ("position = mean").
2. One SAE shared by all heads (width m = `codes`, 200 by default): a tied pre-bias b (zero init, the
   repo passes no geometric median) subtracted before the encoder and added after the decoder; encoder
   linear + ReLU with unit-norm dictionary rows; decoder linear without bias and with unit-norm columns.
   Unit norm is kept by projecting the parallel component out of the gradient and renormalising before
   every forward pass. Loss MSE(x_hat, x) + lambda * mean over vectors of ||f||_1, lambda = 0.02; Adam
   lr 1e-3, 500 full-batch steps, on only `train_examples` = 10 examples drawn at random from the mixed
   positive / negative pool (each contributing one vector per head).
3. Discrete codes: c(e, h) = argmax_f f(e, h), one integer per example and head, on ALL examples.
4. Per-head score: U(h) = |C+_h \\ C-_h|, the number of codes seen on positives and never on negatives
   (`unique`); `fraction` is the optional normalised variant U / |C+_h u C-_h|; `score` = softmax of U over
   all heads (the repo's prediction score).
5. Evaluation: ROC AUC of the scores against a ground-truth head set (`roc_auc`).

Deviations, all deliberate: no per-head normalisation (the method has none); negatives for the induction
task, which has no corrupted prompt, are built here (`induction_negatives`: the second copy replaced by
fresh tokens, so the next token is undetermined, as the method asks of a negative).

Shapes: example (e), head (h, flattened over layers), d_model (d), feature (f).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from headlab.analyses.registry import Analysis, Option, store_model
from headlab.datasets import synthetic
from headlab.errors import InputError, SelectionError, UnsupportedModelError
from headlab.interventions.heads import head_outputs
from headlab.loading import LoadedModel
from headlab.store import Store

Head = tuple[int, int]  # (layer, head)

WIDTH = 200  # m, learned features
L1 = 0.02  # lambda (0.05 for docstring in the paper)
LR = 1e-3
STEPS = 500  # full-batch epochs
TRAIN_EXAMPLES = 10  # num_sae_examples


# --------------------------------------------------------------------------------------------- the SAE


class SparseAutoencoder(nn.Module):
    """The sae-circuits SAE: tied pre-bias, unit-norm encoder rows (ReLU) and decoder columns, no decoder
    bias. Call `normalise()` before each forward and `project_gradients()` after each backward."""

    def __init__(self, d: int, width: int, generator: torch.Generator) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d))  # tied: subtracted before encoding, added after decoding
        self.encoder = nn.Linear(d, width)  # weight [f, d]: dictionary rows
        self.decoder = nn.Linear(width, d, bias=False)  # weight [d, f]: dictionary columns
        with torch.no_grad():
            for layer in (self.encoder, self.decoder):
                bound = 1.0 / layer.weight.shape[1] ** 0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
            self.encoder.bias.zero_()
        self.normalise()

    @torch.no_grad()
    def normalise(self) -> None:
        self.encoder.weight /= self.encoder.weight.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.decoder.weight /= self.decoder.weight.norm(dim=0, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Remove the gradient component parallel to each unit-norm row / column."""
        w, g = self.encoder.weight, self.encoder.weight.grad
        if g is not None:
            g -= (g * w).sum(1, keepdim=True) * w
        w, g = self.decoder.weight, self.decoder.weight.grad
        if g is not None:
            g -= (g * w).sum(0, keepdim=True) * w

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x - self.bias))  # [n, f]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decoder(f) + self.bias, f


def train_sae(
    x: torch.Tensor,
    *,
    width: int = WIDTH,
    l1: float = L1,
    lr: float = LR,
    steps: int = STEPS,
    seed: int = 0,
) -> SparseAutoencoder:
    """Train the shared SAE full-batch on `x` [n, d] (Adam, MSE + l1 * mean_n ||f||_1); deterministic in
    `seed` (the generator seeds the initialisation; CPU float32 training is then reproducible)."""
    if x.ndim != 2 or len(x) == 0:
        raise InputError(f"train_sae needs a non-empty [n, d] matrix, got shape {tuple(x.shape)}")
    if width < 1 or steps < 1:
        raise SelectionError(f"width and steps must be >= 1, got width={width}, steps={steps}")
    x = x.detach().float()
    sae = SparseAutoencoder(x.shape[1], width, torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            sae.normalise()
            x_hat, f = sae(x)
            loss = nn.functional.mse_loss(x_hat, x) + l1 * f.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            sae.project_gradients()
            opt.step()
    sae.normalise()
    return sae.eval()


# ------------------------------------------------------------------------------------ representation


def _output_projection(lm: LoadedModel, tower: str, layer: int) -> torch.Tensor:
    """W_O of one layer as a [d_model, n_heads * d_head] matrix (columns ordered head-major)."""
    module = lm.attention_modules[tower][layer]
    for name in ("o_proj", "out_proj"):
        proj = getattr(module, name, None)
        if isinstance(proj, nn.Linear):
            return proj.weight.detach().float()
    proj = getattr(module, "c_proj", None)  # GPT-2 Conv1D: weight [in, out]
    if proj is not None and hasattr(proj, "weight"):
        return proj.weight.detach().float().T
    raise UnsupportedModelError(
        f"cannot find the attention output projection of {lm.model_type} {tower} layer {layer} "
        "(looked for o_proj, out_proj, c_proj)"
    )


@torch.no_grad()
def residual_head_outputs(
    lm: LoadedModel, prompts: Sequence[str], *, tower: str = "lm", batch_size: int = 64
) -> torch.Tensor:
    """[e, h, d_model]: each head's output written to the residual stream (z_h . W_O^h), averaged over
    each prompt's real tokens; heads flattened layer-major (h = layer * n_heads + head)."""
    if not prompts:
        raise InputError("no prompts given; pass at least one positive and one negative prompt")
    if lm.tokenizer is None:
        raise UnsupportedModelError(f"{lm.model_type} has no tokenizer; the SAE circuit finder needs text")
    info = lm.tower(tower)
    heads = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    w_o = [_output_projection(lm, tower, layer) for layer in range(info.n_layers)]
    d = info.head_dim
    side = lm.tokenizer.padding_side
    lm.tokenizer.padding_side = "right"
    try:
        parts = []
        for start in range(0, len(prompts), batch_size):
            inputs = lm.tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
            )
            z = head_outputs(lm, inputs, heads, tower=tower)  # {(l, h): [b, t, d_head]}
            real = inputs["attention_mask"].float()  # [b, t]
            rows = []
            for layer, head in heads:
                mean_z = (z[layer, head] * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # [b, d_head]
                rows.append(mean_z @ w_o[layer][:, head * d : (head + 1) * d].T)  # [b, d_model]
            parts.append(torch.stack(rows, 1))  # [b, h, d_model]
    finally:
        lm.tokenizer.padding_side = side
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------- scoring


def unique_code_counts(codes: np.ndarray, positive: np.ndarray) -> pd.DataFrame:
    """Per head (column of `codes` [e, h], integer codes): n_pos = |C+_h|, n_neg = |C-_h|, unique =
    |C+_h \\ C-_h| and fraction = unique / |C+_h u C-_h|; `positive` [e] marks the positive examples."""
    codes, positive = np.asarray(codes), np.asarray(positive, dtype=bool)
    if codes.ndim != 2 or len(codes) != len(positive):
        raise InputError(f"codes must be [examples, heads] with one flag per example; got {codes.shape}")
    if positive.all() or not positive.any():
        raise InputError("need both positive and negative examples to find codes unique to positives")
    rows = []
    for h in range(codes.shape[1]):
        pos, neg = set(codes[positive, h].tolist()), set(codes[~positive, h].tolist())
        rows.append(
            {
                "n_pos": len(pos),
                "n_neg": len(neg),
                "unique": len(pos - neg),
                "fraction": len(pos - neg) / len(pos | neg),
            }
        )
    return pd.DataFrame(rows)


def _softmax(u: np.ndarray) -> np.ndarray:
    e = np.exp(u - u.max())
    return e / e.sum()


@dataclass(frozen=True, kw_only=True)
class SaeResult:
    """The per-head frame and what produced it (the SAE and every example's codes [e, h])."""

    frame: pd.DataFrame
    codes: np.ndarray
    positive: np.ndarray
    sae: SparseAutoencoder


def sae_head_scores(
    lm: LoadedModel, positives: Sequence[str], negatives: Sequence[str], **settings
) -> pd.DataFrame:
    """DataFrame(tower, layer, head, unique, fraction, n_pos, n_neg, score) for every head of `tower`:
    `score` is the softmax over heads of `unique` (codes seen only on positives). `settings` as
    `sae_circuit` (width, steps, l1, train_examples, seed, tower), which also returns the codes and the SAE."""
    return sae_circuit(lm, positives, negatives, **settings).frame


def sae_circuit(
    lm: LoadedModel,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    width: int = WIDTH,
    steps: int = STEPS,
    l1: float = L1,
    train_examples: int = TRAIN_EXAMPLES,
    seed: int = 0,
    tower: str = "lm",
) -> SaeResult:
    """The whole node-level method (module docstring): representation, SAE trained on `train_examples`
    examples drawn (seeded) from the mixed pool, argmax codes on all examples, per-head scores."""
    if not positives or not negatives:
        raise InputError(f"need positives and negatives, got {len(positives)} and {len(negatives)}")
    x = residual_head_outputs(lm, list(positives) + list(negatives), tower=tower)  # [e, h, d]
    positive = np.arange(len(x)) < len(positives)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: max(1, train_examples)]
    sae = train_sae(x[pick].flatten(0, 1), width=width, l1=l1, steps=steps, seed=seed)
    with torch.no_grad():
        codes = sae.encode(x.flatten(0, 1)).argmax(-1).view(x.shape[0], x.shape[1]).numpy()  # [e, h]
    frame = unique_code_counts(codes, positive)
    n_heads = lm.tower(tower).n_heads
    frame.insert(0, "head", np.arange(len(frame)) % n_heads)
    frame.insert(0, "layer", np.arange(len(frame)) // n_heads)
    frame.insert(0, "tower", tower)
    frame["score"] = _softmax(frame.unique.to_numpy(dtype=float))
    return SaeResult(frame=frame, codes=codes, positive=positive, sae=sae)


def roc_auc(
    scores: pd.DataFrame | Mapping[Head, float], truth: Iterable[Head], *, column: str = "score"
) -> float:
    """ROC AUC of per-head scores (a frame with layer, head and `column`, or {(layer, head): score})
    against the ground-truth head set `truth`."""
    from sklearn.metrics import roc_auc_score

    if isinstance(scores, pd.DataFrame):
        scores = {(int(r.layer), int(r.head)): float(getattr(r, column)) for r in scores.itertuples()}
    truth = {(int(layer), int(head)) for layer, head in truth}
    unknown = truth - set(scores)
    if unknown:
        raise SelectionError(f"ground-truth heads {sorted(unknown)} have no score")
    labels = [key in truth for key in scores]
    if all(labels) or not any(labels):
        raise SelectionError("the ground truth must contain some but not all scored heads for a ROC AUC")
    return float(roc_auc_score(labels, list(scores.values())))


# ------------------------------------------------------------------------------------------------- tasks


def induction_negatives(
    examples: Sequence[synthetic.Example], *, vocab: int = 64, seed: int = 0
) -> list[str]:
    """One negative per induction example: the same prompt with every token of the (partial) second copy
    replaced by distinct fresh "w<i>" tokens absent from the first copy, so nothing repeats and the next
    token is undetermined (same length, same prefix, same first copy)."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        words = ex.prompt.split(" ")
        second = ex.get("start") + ex.get("first_copy")  # index of the second copy's first token
        seen = set(words[:second])
        fresh = [w for w in (f"w{i}" for i in range(vocab)) if w not in seen]
        if len(fresh) < len(words) - second:
            raise InputError(f"vocab {vocab} is too small to replace the second copy of {ex.prompt!r}")
        out.append(" ".join(words[:second] + rng.sample(fresh, len(words) - second)))
    return out


def task_prompts(task: str, n: int, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """(positives, negatives) for a synthetic task: the clean prompts, and the corrupted ones (the
    generators' corruption; for induction, `induction_negatives`)."""
    if task not in synthetic.TASKS:
        raise SelectionError(f"unknown task {task!r}; choose one of {sorted(synthetic.TASKS)}")
    examples = synthetic.TASKS[task](n, seed=seed)
    if task == "induction":
        return [e.prompt for e in examples], induction_negatives(examples, seed=seed)
    if any(e.corrupted is None for e in examples):
        raise SelectionError(
            f"task {task!r} has no corrupted prompts to use as negatives; use induction, ioi, greater_than, "
            "colored_objects or pairwise_judge"
        )
    return [e.prompt for e in examples], [e.corrupted for e in examples]


def parse_heads(text: str) -> list[Head]:
    """ "0.0,0.2,1.0" (layer.head, comma-separated) -> [(0, 0), (0, 2), (1, 0)]."""
    heads = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            layer, head = (int(v) for v in part.split("."))
        except ValueError as err:
            raise SelectionError(f"ground-truth head {part!r}: write layer.head, e.g. 1.0") from err
        heads.append((layer, head))
    return heads


def _check_truth(truth: list[Head], lm: LoadedModel) -> None:
    """The ground-truth heads exist in the model and leave some heads out (a ROC AUC needs both classes)."""
    info = lm.tower("lm")
    outside = [f"{la}.{h}" for la, h in truth if not (0 <= la < info.n_layers and 0 <= h < info.n_heads)]
    if outside or len(set(truth)) == info.n_layers * info.n_heads:
        raise SelectionError(
            f"analysis 'sae-circuit': option truth must name some but not all heads of the model "
            f"({info.n_layers} layers x {info.n_heads} heads)"
            + (f"; {', '.join(outside)} are outside it" if outside else "")
        )


def _run(store: Store, options: dict) -> pd.DataFrame:
    truth = parse_heads(options["truth"] or "")  # before any work
    lm = store_model(store)
    _check_truth(truth, lm)
    positives, negatives = task_prompts(options["task"], options["n"], seed=options["seed"])
    frame = sae_head_scores(
        lm, positives, negatives, width=options["codes"], steps=options["steps"], seed=options["seed"]
    )
    frame["in_truth"] = [(int(r.layer), int(r.head)) in set(truth) for r in frame.itertuples()]
    frame["auc"] = roc_auc(frame, truth) if truth else float("nan")
    return frame


# tasks with negatives: induction's are built here, the others' are their corrupted prompts
_TASKS = tuple(sorted(set(synthetic.TASKS) - {"multi_doc_qa"}))

ANALYSES = {
    "sae-circuit": Analysis(
        name="sae-circuit",
        description=(
            "Discrete-SAE circuit finding (O'Neill & Bui 2024): one SAE over every head's residual output, "
            "argmax codes, per-head count of codes seen only on the task's clean prompts; ROC AUC vs truth"
        ),
        run=_run,
        options={
            "task": Option(type=str, default="induction", choices=_TASKS, help="synthetic task"),
            "n": Option(type=int, default=250, ge=1, help="positive prompts (and as many negatives)"),
            "seed": Option(
                type=int,
                default=0,
                ge=0,
                help="seed of the prompts, the SAE initialisation and its training examples",
            ),
            "codes": Option(
                type=int,
                default=WIDTH,
                ge=2,
                help="SAE width m: the number of discrete codes (with one, no code can be unique to positives)",
            ),
            "steps": Option(type=int, default=STEPS, ge=1, help="full-batch Adam steps"),
            "truth": Option(
                type=str,
                default=None,
                optional=True,
                help="ground-truth heads as layer.head,... (e.g. 0.0,0.2,1.0) for the ROC AUC",
            ),
        },
    )
}
