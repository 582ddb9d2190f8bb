"""The attention session: one per model while any capture or intervene block is open.

Lifetimes. The first block to enter switches the model's configs to the "headlab" attention function,
tags every attention module with its (tower, layer) site and the session, and adds one forward pre-hook
on the whole model; the last block to leave removes all of it (also after an exception), and the model is
as it was. Blocks nest in any order: `capture` inside `intervene` and `intervene` inside `capture` are the
same session with the same handlers.

Handlers, in a fixed order per attention call (whatever order the blocks were opened in):
1. observers before the edits (`Observer.observe`): captures record the attention the model computes
   without the edits (statistics, rows, compact attention) and may hand back that unedited output;
2. edits (`Editor`): the patches of every open intervene block, in opening order, compute the output;
3. observers after the edits (`Observer.observed`): captures record the head outputs actually used.
A layer no handler wants runs transformers' own SDPA (or, under a soft-cap, headlab's fused attention).

An LVLM whose generate() runs its vision tower and then its language model's own generate() (BLIP-2,
InstructBLIP) never calls its forward while generating: inside the session its generate() announces its
inputs as a pass, and a pre-hook on the language model begins the decode steps' passes.

Per forward pass, the pre-hook first lets editors run their own passes (`Editor.on_pass`: VHR's selection,
VAR's sink search) and then every block builds its batch contexts. A pass an editor runs for itself
(`side_pass`) is served by the editors only; observers neither see nor record it.

KV caches. The session knows how many token columns (cached + new tokens) the current pass of the
language model has, and maps each language-model call's keys to them before any handler sees it
(`headlab.probe.keys.call_keys`): a static cache's unfilled slots are dropped (the model's own attention
never sees them either), and a sliding-window cache's evicted columns are counted (`call.key_start`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers import GenerationMixin

from headlab.compat import past_length
from headlab.errors import SelectionError
from headlab.loading import LoadedModel
from headlab.probe.attention import plain_attention, switched_to_headlab
from headlab.probe.call import AttentionCall
from headlab.probe.keys import call_keys, pass_columns


class Observer:
    """A block that records: sees every pass and every attention call, never changes the output."""

    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        return None

    def observe(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Record before the edits; return the unedited (out [b, h, q, d], lse) when it was computed anyway."""
        return None

    def wants_output(self, call: AttentionCall) -> bool:
        """Whether `observed` needs this call's output (the session then computes it fused if no one has)."""
        return False

    def observed(self, call: AttentionCall, out: torch.Tensor) -> None:
        """Record after the edits: `out` [b, h, q, d] is the output the model goes on with."""
        return None


class Editor:
    """A block that edits attention: serves calls with its patches (see headlab.interventions.core)."""

    engine: str = "fused"

    def on_pass(self, kwargs: dict) -> None:
        return None

    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        return None

    def view(self, call: AttentionCall) -> AttentionCall:
        """`call` with this block's batch context."""
        raise NotImplementedError

    def active(self, call: AttentionCall) -> list:
        """This block's patches that touch the call's layer, in order."""
        return []


class Session:
    """The handlers of one model's open blocks, and the dispatch of its attention calls."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.observers: list[Observer] = []
        self.editors: list[Editor] = []
        self.calibrating = False  # True during an editor's own pass (`side_pass`)
        self.columns: int | None = None  # token columns of the current language-model pass (None: unknown)
        self._in_outer = False  # inside the whole model's forward
        # LLaVA-NeXT: per row of the language model's current input, the columns holding the image newline
        self.newline_columns: list[torch.Tensor] | None = None
        self._generate_prefill = False  # an LVLM's generate() began a pass its language model continues

    def on_outer_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the whole model: a pass begins (`on_model_call`)."""
        self._in_outer = True
        self.on_model_call(module, args, kwargs)

    def on_outer_return(self, module: nn.Module, args: tuple, output) -> None:
        self._in_outer = False

    def on_generate(self, kwargs: dict) -> None:
        """An LVLM's own generate() begins (BLIP-2, InstructBLIP: it runs the vision tower and then the
        language model's generate(), never its own forward): its inputs begin the pass, as a forward's do;
        the language model's prefill then continues that pass (`on_inner_call`)."""
        self.on_model_call(self.lm.model, (), kwargs)
        self._generate_prefill = True

    def on_inner_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of an LVLM's language model that generates on its own: a pass of its own only
        when neither the whole model's forward nor an editor's side pass is running it, and it is not the
        prefill of a generate() already begun (`on_generate`)."""
        if self._in_outer or self.calibrating:
            return
        if self._generate_prefill and not past_length(kwargs):
            self._generate_prefill = False
            self.columns = pass_columns(args, kwargs)
            return
        self.on_model_call(module, args, kwargs)

    def on_language_model_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of an LVLM's language model whose family puts a learned newline vector after each
        row of image features: which columns of its input embeddings are that vector."""
        embeds = kwargs.get("inputs_embeds")
        newline = self.lm.model.get_parameter(self.lm.adapter.image_newline_attr)
        if embeds is None or past_length(kwargs):
            self.newline_columns = None
            return
        hit = (embeds == newline.to(embeds)).all(-1)  # [batch, n]: an exact copy of the vector
        self.newline_columns = [row.nonzero().flatten().cpu() for row in hit]

    def on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward pass begins: editors' own passes first, then every block's contexts."""
        self.columns = pass_columns(args, kwargs)
        self.newline_columns = None
        for editor in list(self.editors):
            editor.on_pass(kwargs)
        for handler in (*self.editors, *self.observers):
            handler.on_model_call(module, args, kwargs)

    def side_pass(self, **inputs):
        """Run the model on `inputs` for an editor's own purposes (e.g. VHR's selection pass): editors serve
        it (they see `session.calibrating`), observers neither see nor record it."""
        self.calibrating = True
        columns, self.columns = self.columns, pass_columns((), inputs)
        try:
            for editor in self.editors:
                editor.on_model_call(self.lm.model, (), inputs)
            model = self.lm.model if "pixel_values" in inputs else self.lm.text_model
            with torch.no_grad():  # forward(): the model-level pre-hook stays out
                return (model.forward if model is self.lm.model else model)(**inputs)
        finally:
            self.calibrating, self.columns = False, columns

    def attend(self, module, q, k, v, mask, *, scaling=None, is_causal=None, dropout=0.0, **kwargs):
        """The attention function of a tagged module: observers, edits, observers (module docstring)."""
        columns = self.columns if module._headlab_site[0] == "lm" else None  # only the LM has a KV cache
        k, v, mask, key_start = call_keys(k, v, mask, columns=columns, n_q=q.shape[2])
        call = AttentionCall.build(
            module, q, k, v, mask, scaling=scaling, is_causal=is_causal, key_start=key_start, **kwargs
        )
        if self.lm.tensor_parallel is not None:  # this rank's heads are a contiguous block of the tower's
            call.head_offset = self.lm.tensor_parallel[0] * q.shape[1]
        observers = () if self.calibrating else tuple(self.observers)
        unedited = None
        for observer in observers:
            got = observer.observe(call)
            if unedited is None:
                unedited = got
        out = self._edited(call)
        if out is None and unedited is not None:
            out = unedited[0]
        if out is None and any(observer.wants_output(call) for observer in observers):
            out = call.plain[0]
        if out is None:
            return plain_attention(
                module, q, k, v, mask, scaling=call.scale, is_causal=is_causal, dropout=dropout, **kwargs
            )
        for observer in observers:
            observer.observed(call, out)
        return out.to(v.dtype).transpose(1, 2).contiguous(), None

    def _edited(self, call: AttentionCall) -> torch.Tensor | None:
        """The output [b, h, q, d] fp32 of every open editor's active patches, or None if none touches it."""
        from headlab.interventions.core import edited_attention  # interventions sit above the probe

        active = [(editor, editor.active(call)) for editor in self.editors]
        active = [(editor, patches) for editor, patches in active if patches]
        if not active:
            return None
        editor = active[0][0]  # the outermost editing block's context serves the call
        return edited_attention(editor.view(call), [p for _, ps in active for p in ps], editor.engine)


def session_of(lm: LoadedModel) -> Session | None:
    return getattr(lm.model, "_headlab_session", None)


@contextmanager
def in_session(lm: LoadedModel, handler: Observer | Editor) -> Iterator[Session]:
    """Add `handler` to the model's session (opening the session if it is the first) for the block."""
    with ExitStack() as stack:
        session = session_of(lm)
        if session is None:
            session = stack.enter_context(_opened(lm))
        group = session.editors if isinstance(handler, Editor) else session.observers
        if isinstance(handler, Editor) and any(e.engine != handler.engine for e in session.editors):
            raise SelectionError(
                f"nested intervene() blocks must use one engine; the open block uses {session.editors[0].engine!r}"
            )
        group.append(handler)
        stack.callback(group.remove, handler)
        yield session


@contextmanager
def _opened(lm: LoadedModel) -> Iterator[Session]:
    session = Session(lm)
    tagged: list[nn.Module] = []
    with ExitStack() as stack:
        stack.enter_context(switched_to_headlab(lm.model))
        for handle in (
            lm.model.register_forward_pre_hook(session.on_outer_call, with_kwargs=True),
            lm.model.register_forward_hook(session.on_outer_return, always_call=True),
        ):
            stack.callback(handle.remove)
        if lm.adapter.image_newline_attr is not None:
            language_model = lm.model.get_submodule(lm.tower("lm").path.rsplit(".", 1)[0])
            handle = language_model.register_forward_pre_hook(
                session.on_language_model_input, with_kwargs=True
            )
            stack.callback(handle.remove)
        inner = _generating_language_model(lm)
        if inner is not None:
            handle = inner.register_forward_pre_hook(session.on_inner_call, with_kwargs=True)
            stack.callback(handle.remove)
            stack.enter_context(_generate_announced(lm.model, session))
        lm.model._headlab_session = session
        stack.callback(delattr, lm.model, "_headlab_session")
        for tower, modules in lm.attention_modules.items():
            for layer, module in enumerate(modules):
                module._headlab_site, module._headlab_session = (tower, layer), session
                tagged.append(module)
        stack.callback(_untag, tagged)
        yield session


def _generating_language_model(lm: LoadedModel) -> nn.Module | None:
    """The language model of an LVLM whose generate() calls that language model's own generate() (BLIP-2,
    InstructBLIP): the whole model's forward hooks never fire while it generates. None for other models."""
    inner = getattr(lm.model, "language_model", None)
    return inner if isinstance(inner, GenerationMixin) and inner is not lm.model else None


@contextmanager
def _generate_announced(model: nn.Module, session: Session) -> Iterator[None]:
    """`model.generate` tells the session its inputs first (Session.on_generate); restored on exit."""
    own = model.generate

    @functools.wraps(own)
    def generate(*args, **kwargs):
        session.on_generate(kwargs)
        return own(*args, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        del model.generate  # the class's method again


def _untag(modules: list[nn.Module]) -> None:
    for m in modules:
        for name in ("_headlab_site", "_headlab_session"):
            if hasattr(m, name):
                delattr(m, name)
