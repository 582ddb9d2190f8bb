"""The coverage matrix: the model types headlab is tested on, how each is served, and the README's table.

One `Entry` per tested model type, grouped by family (`MATRIX`): LLMs and vision towers here; LVLM rows
are added to their family's tuple the same way. Each entry declares what its tests check on a tiny random
model of that type (built by `headlab.zoo.random_models.build_random(entry.random_builder)`): the route of
its attention, whether the tiny model has sliding-window layers or soft-capped logits, whether PINE applies
and, where they differ from its family's, its token roles. `tests/test_matrix_llm.py` and
`tests/test_matrix_vision.py` run every entry and assert each declaration against the loaded model, so the
table printed from these entries is what the tests prove:

    python -m headlab.models.matrix          # the README's "Coverage matrix" table

This module imports neither torch nor transformers (`hl.SUPPORTED` reads `served_types()`).
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass

from headlab.compat import TRANSFORMERS_VERSION
from headlab.models.adapter import Family


class Route(enum.Enum):
    """How headlab reaches a model's attention: through AttentionInterface, or not at all (refused, with an
    UnsupportedModelError saying why)."""

    INTERFACE = "AttentionInterface"
    # transformers computes the attention itself, not through the interface
    EAGER_ONLY = "refused: eager only"
    # learned sink logits, which headlab's attention function does not compute
    SINKS = "refused: attention sinks"
    # attention over shifted windows in hierarchical stages (Swin)
    WINDOWED = "refused: windowed stages"
    # cross-attention layers whose keys are not tokens of the sequence (Mllama)
    CROSS_ATTENTION = "refused: cross-attention layers"


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One tested model type and what its tests check.

    `builder` names its tiny random model (default: the model type, built from its config class);
    `sliding`: the tiny model has sliding-window layers (its window is shorter than the test prompts);
    `softcap`: its attention logits are soft-capped; `pine`: PINE applies (a full-width rotary table next
    to the layer list, no soft-cap), else binding or running PINE is an UnsupportedModelError; `roles`: the
    token roles its captures carry, where they differ from its family's (`ROLES`)."""

    model_type: str
    family: Family = Family.LLM
    route: Route = Route.INTERFACE
    builder: str | None = None
    sliding: bool = False
    softcap: bool = False
    pine: bool = False
    roles: tuple[str, ...] | None = None
    uncaptured: tuple[str, ...] = ()  # LVLMs: attention stacks that are no tower (InstructBLIP's Q-Former)
    # compact attention rebuilds the main tower's rows (a causal, windowed or full mask, no score bias); else
    # (Gemma 3's bidirectional image blocks, BEiT's relative position bias) the store keeps selected rows
    compact: bool = True

    @property
    def random_builder(self) -> str:
        return self.builder or self.model_type

    @property
    def served(self) -> bool:
        return self.route is Route.INTERFACE

    @property
    def token_roles(self) -> tuple[str, ...]:
        return self.roles if self.roles is not None else ROLES[self.family]


def _routed_since(release: tuple[int, int]) -> Route:
    """The route of a type whose modeling code calls AttentionInterface from transformers `release` on
    (earlier releases compute its attention themselves, and discovery refuses it there)."""
    return Route.INTERFACE if release <= TRANSFORMERS_VERSION else Route.EAGER_ONLY


def _llm(model_type: str, **declared) -> Entry:
    return Entry(model_type=model_type, family=Family.LLM, **declared)


def _refused(model_type: str, route: Route, family: Family = Family.LLM) -> Entry:
    return Entry(model_type=model_type, family=family, route=route)


def _vision(model_type: str, **declared) -> Entry:
    return Entry(model_type=model_type, family=Family.VIT, **declared)


LLM: tuple[Entry, ...] = (
    # learned or absolute positions, or rotary applied inside each attention module
    _llm("gpt2"),
    _llm("gpt_bigcode"),  # multi-query attention: one KV head
    _llm("opt"),
    _llm("biogpt"),
    _llm("gptj", route=_routed_since((5, 24))),  # eager only up to transformers 5.23
    _llm("codegen", route=_routed_since((5, 24))),
    # partial-width rotary embeddings
    _llm("gpt_neox"),
    _llm("phi"),
    _llm("persimmon"),
    _llm("stablelm"),
    _llm("glm"),
    _llm("glm4"),
    _llm("nemotron"),
    # full-width rotary embeddings
    _llm("llama", pine=True),
    _llm("qwen2", pine=True),
    _llm("qwen3", pine=True),
    _llm("gemma", pine=True),
    _llm("olmo", pine=True),
    _llm("olmo2", pine=True),
    _llm("granite", pine=True),
    _llm("cohere"),  # interleaved RoPE: PINE refuses
    _llm("smollm3", pine=True),
    _llm("seed_oss", pine=True),
    # full-width rotary embeddings on interleaved pairs (PINE rotates halves: not claimed)
    _llm("helium"),
    _llm("ernie4_5"),
    # mixtures of experts
    _llm("qwen2_moe", pine=True),
    _llm("qwen3_moe", pine=True),
    _llm("olmoe", pine=True),
    _llm("granitemoe", pine=True),
    _llm("jetmoe", pine=True),
    _llm("mixtral", sliding=True, pine=True),
    # sliding-window layers (all, or alternating with full attention)
    _llm("mistral", sliding=True, pine=True),
    _llm("ministral3", sliding=True, pine=True),
    _llm("phi3", sliding=True, pine=True),
    _llm("starcoder2", sliding=True, pine=True),
    _llm("cohere2", sliding=True),  # interleaved RoPE: PINE refuses
    _llm("exaone4", sliding=True, pine=True),
    _llm("olmo3", sliding=True),  # one rotary table per layer type: none PINE can read
    _llm("gemma3_text", sliding=True),
    # soft-capped attention logits (and alternating windows)
    _llm("gemma2", sliding=True, softcap=True),
    _llm("vaultgemma", sliding=True, softcap=True),
    # refused, with the reason
    _refused("bloom", Route.EAGER_ONLY),  # ALiBi
    _refused("falcon", Route.EAGER_ONLY),  # its own SDPA call
    _refused("mpt", Route.EAGER_ONLY),
    _refused("gpt_neo", Route.EAGER_ONLY),
    _refused("xglm", Route.EAGER_ONLY),
    _refused("openai-gpt", Route.EAGER_ONLY),
    _refused("gpt_oss", Route.SINKS),
    _refused("granite_swa", Route.SINKS),
)

# vision towers: an encoder over prefix tokens (CLS-like, registers) and the patch grid, bidirectional
VISION: tuple[Entry, ...] = (
    _vision("vit"),
    _vision("deit"),  # CLS and distillation token, both role "cls"
    _vision("dinov2"),
    _vision("dinov2_with_registers", roles=("cls", "register", "patch")),  # CLS, 4 registers, the grid
    _vision("clip_vision_model", builder="clip_vision"),
    _vision("siglip_vision_model", builder="siglip_vision", roles=("patch",)),  # no CLS token
    _vision("vit_msn"),
    _vision("ijepa", roles=("patch",)),  # no CLS token
    _vision("beit", compact=False),  # a relative position bias, added to the scores through the mask
    # refused, with the reason
    _refused("swin", Route.WINDOWED, Family.VIT),
)


def _lvlm(model_type: str, **declared) -> Entry:
    return Entry(model_type=model_type, family=Family.LVLM, **declared)


# LLaVA-NeXT's and LLaVA-OneVision's image tokens include a newline after each row of image features
_NEWLINE_ROLES = ("bos", "text", "image", "image_newline", "answer")

# vision-language models: a vision tower and a language model (towers found by the sub-config their
# attention modules hold); the image tokens of the input ids have role "image"
LVLM: tuple[Entry, ...] = (
    _lvlm("llava", pine=True),  # CLIP + Llama; LLaVA-1.5
    _lvlm("llava_next", pine=True, roles=_NEWLINE_ROLES),  # any-resolution tiles, image-newline tokens
    _lvlm("llava_onevision", pine=True, roles=_NEWLINE_ROLES),  # SigLIP (no CLS) + Qwen2, any-resolution
    _lvlm("qwen2_vl"),  # per-image vision calls, M-RoPE: PINE refuses
    _lvlm("qwen2_5_vl"),  # windowed and full vision layers, M-RoPE
    _lvlm("paligemma"),  # prefix-LM mask: image and prompt attend both ways (PINE refuses: not causal)
    _lvlm("gemma3", sliding=True, compact=False),  # an image's tokens attend both ways; sliding layers
    _lvlm("idefics3", pine=True),  # image tiles; a pixel-shuffle connector
    _lvlm("aya_vision", sliding=True),  # no adapter: discovered; Cohere 2 (interleaved RoPE: PINE refuses)
    _lvlm("blip-2", builder="blip_2", pine=False, uncaptured=("qformer.encoder.layer",)),  # Q-Former + OPT
    _lvlm("instructblip", uncaptured=("qformer.encoder.layer",)),
    _refused("mllama", Route.CROSS_ATTENTION, Family.LVLM),
)

# family -> its entries, in table order
MATRIX: dict[Family, tuple[Entry, ...]] = {Family.LLM: LLM, Family.LVLM: LVLM, Family.VIT: VISION}

# the token roles each family's captures are tested to carry (LLMs: "answer" on decode steps); an entry
# whose roles differ declares its own (`Entry.roles`)
ROLES = {
    Family.LLM: ("bos", "text", "answer"),
    Family.LVLM: ("bos", "text", "image", "answer"),
    Family.VIT: ("cls", "patch"),
}


def entries(family: Family | None = None) -> tuple[Entry, ...]:
    """The entries of one family, or of every family in MATRIX order."""
    if family is not None:
        return MATRIX.get(family, ())
    return tuple(e for group in MATRIX.values() for e in group)


def family_of(model_type: str) -> Family | None:
    """The family of a model type of the matrix (None for a type it does not list)."""
    return next((e.family for e in entries() if e.model_type == model_type), None)


def served_types() -> tuple[str, ...]:
    """The model types of the matrix headlab serves (route: the interface)."""
    return tuple(e.model_type for e in entries() if e.served)


COLUMNS = ("type", "family", "attention route", "roles", "generation", "interventions")


def row(entry: Entry) -> tuple[str, ...]:
    """One table row: what the tests prove about the entry."""
    if not entry.served:
        return (f"`{entry.model_type}`", entry.family.value, entry.route.value, "-", "-", "-")
    notes = [name for name, on in (("soft-cap", entry.softcap), ("sliding windows", entry.sliding)) if on]
    route = entry.route.value + (f" ({', '.join(notes)})" if notes else "")
    if entry.family is Family.VIT:
        generation = "- (encoder)"
    else:
        generation = "KV cache, captured" + (" (sliding-window cache)" if entry.sliding else "")
    interventions = "head scale / ablation" + (", VHR, VAR" if entry.family is Family.LVLM else "")
    interventions += ", PINE" if entry.pine else ""
    return (
        f"`{entry.model_type}`",
        entry.family.value,
        route,
        ", ".join(entry.token_roles),
        generation,
        interventions,
    )


def table(family: Family | None = None) -> str:
    """The Markdown table of one family's entries (every family's without one)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(e)) + " |" for e in entries(family)]
    return "\n".join(lines)


def main() -> None:
    sys.stdout.write(table() + "\n")


if __name__ == "__main__":
    main()
