"""The LMLM model family: named shapes, the pretraining loss mask, normalized perplexity.

Models are plain Hugging Face causal LMs (``GPT2LMHeadModel`` or ``LlamaForCausalLM``), so a
checkpoint is a ``save_pretrained`` safetensors folder that ``AutoModelForCausalLM`` and vLLM load.
An LMLM differs from a standard LM only in its data (text with lookup calls) and its loss mask:

    token    born  in  <|db_entity|>  Napoleon  <|db_relationship|>  birthplace  <|db_return|>  Ajaccio  <|db_end|>  Ajaccio
    loss     yes   yes  yes           yes       yes                  yes         yes            no       no          yes

The value between ``<|db_return|>`` and ``<|db_end|>`` comes from the database at inference, so the
model is never asked to predict it, nor the ``<|db_end|>`` that the lookup appends after it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.tokenizer import LookupTokenIds, lookup_token_ids
from schemas.errors import UserInputError
from schemas.markup import strip


@dataclass(frozen=True)
class ModelShape:
    family: str  # "llama" (RoPE, SwiGLU, RMSNorm) or "gpt2" (learned positions, GELU, LayerNorm)
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # MLP hidden width
    context_length: int
    tie_embeddings: bool


# Parameter counts in the names assume the reference vocabularies: 50,257 (GPT-2) and 32,000 (LLaMA-2).
# The LLaMA-2-style shapes keep LlamaConfig's default MLP width 11008 and untied embeddings, which is
# what makes 512 dims x 8 layers come to 176M and 768 x 12 to 382M.
MODEL_SHAPES: dict[str, ModelShape] = {
    # smoke tests: ~50k parameters plus embeddings; learns nothing useful, runs in milliseconds
    "micro": ModelShape("llama", d_model=64, n_layers=2, n_heads=2, d_ff=172, context_length=256, tie_embeddings=True),
    # CPU demo: ~4M parameters with a 4k vocabulary; learns the synthetic corpus in minutes
    "tiny": ModelShape("llama", d_model=256, n_layers=4, n_heads=4, d_ff=688, context_length=512, tie_embeddings=True),
    "gpt2-124m": ModelShape("gpt2", d_model=768, n_layers=12, n_heads=12, d_ff=3072, context_length=1024, tie_embeddings=True),
    "llama2-176m": ModelShape("llama", d_model=512, n_layers=8, n_heads=8, d_ff=11008, context_length=1024, tie_embeddings=False),
    "llama2-382m": ModelShape("llama", d_model=768, n_layers=12, n_heads=12, d_ff=11008, context_length=1024, tie_embeddings=False),
}


def build_model(name: str, vocab_size: int, *, context_length: int | None = None, eos_token_id: int | None = None):
    """A freshly initialised causal LM of shape ``name`` (a key of MODEL_SHAPES), or the pretrained
    hub/local model ``name`` with its embeddings resized to ``vocab_size`` when they differ.

    The caller seeds torch first; same seed, same weights.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    shape = MODEL_SHAPES.get(name)
    if shape is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise UserInputError(
                f"model {name!r}: not a known shape ({', '.join(MODEL_SHAPES)}) and not loadable as a hub name or "
                f"folder ({str(exc).splitlines()[0]})"
            ) from exc
        if model.get_input_embeddings().num_embeddings != vocab_size:
            model.resize_token_embeddings(vocab_size)  # the tokenizer gained the lookup tokens
        return model
    context_length = context_length or shape.context_length
    ids = dict(bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    if shape.family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=context_length, n_embd=shape.d_model, n_layer=shape.n_layers,
            n_head=shape.n_heads, n_inner=shape.d_ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=shape.tie_embeddings, **ids,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.d_model, intermediate_size=shape.d_ff,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_heads,
        max_position_embeddings=context_length, tie_word_embeddings=shape.tie_embeddings, **ids,
    )
    return LlamaForCausalLM(config)


def context_length_of(model) -> int:
    """The longest sequence the model's position encoding was built for."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or config.n_positions


def count_parameters(model) -> int:
    """Distinct trainable parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def flop_parameters(model) -> int:
    """Parameters that take part in a matrix multiply per token (for the 6·N FLOPs rule): all of them
    but the lookup tables, i.e. input embeddings unless tied to the output layer, and learned positions."""
    n = count_parameters(model)
    if not model.config.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)  # GPT-2's learned positions
    return n - (wpe.weight.numel() if wpe is not None else 0)


def loss_mask(input_ids: torch.Tensor, special_ids: LookupTokenIds | None) -> torch.Tensor:
    """Bool tensor shaped like ``input_ids`` (..., T): True where the token is a training target.

    False for the value tokens after ``<|db_return|>`` and for the ``<|db_end|>`` that closes them.
    The running state is "the last lookup marker before this token": a token is masked when that
    marker is ``<|db_return|>``. A row that starts inside a value (a packed block cut mid-call) has
    no marker before its first tokens; they are masked when the row's first marker is ``<|db_end|>``.
    ``special_ids=None`` (the standard baseline) trains every token.
    """
    if special_ids is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    ret, end = special_ids.ret, special_ids.end
    T = input_ids.shape[-1]
    marker = torch.where(input_ids == ret, 1, torch.where(input_ids == end, 2, 0))  # 1 return, 2 end
    pos = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    # index of the last marker strictly before each position, -1 if none
    last_at_or_before = torch.where(marker > 0, pos, -1).cummax(dim=-1).values
    last_before = torch.cat([torch.full_like(last_at_or_before[..., :1], -1), last_at_or_before[..., :-1]], dim=-1)
    state = marker.gather(-1, last_before.clamp(min=0))
    inside_value = (last_before >= 0) & (state == 1)
    # before any marker: inside a value iff the row's first marker closes one
    first_idx = torch.where(marker > 0, pos, T).min(dim=-1, keepdim=True).values
    first_marker = marker.gather(-1, first_idx.clamp(max=T - 1))
    leading_value = (last_before < 0) & (first_idx < T) & (first_marker == 2)
    return ~(inside_value | leading_value)


def masked_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over masked-in targets, number of those targets).

    logits (B, T, V) predict input_ids[:, 1:]; mask (B, T) is over targets, its first column unused.
    """
    targets, keep = input_ids[:, 1:], mask[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (nll * keep.flatten()).sum(), keep.sum()


@dataclass
class Perplexity:
    """Summed loss over trained tokens, and the two token counts it can be normalised by."""

    nll_sum: float
    trained_tokens: int  # targets with loss (LMLM: calls included, values excluded)
    source_tokens: int  # tokens of the call-free source text

    @property
    def loss(self) -> float:
        """Mean loss per trained token."""
        return self.nll_sum / max(self.trained_tokens, 1)

    @property
    def normalized(self) -> float:
        """exp(loss summed over trained tokens / tokens of the original text): comparable across LMLM and standard."""
        return math.exp(self.nll_sum / max(self.source_tokens, 1))


@torch.no_grad()
def normalized_perplexity(
    model, tokenizer, texts: list[str], *, lookup_calls: bool = True, context_length: int | None = None,
    batch_size: int = 8, autocast_dtype: torch.dtype | None = None,
) -> Perplexity:
    """Evaluate ``model`` on whole documents ``texts`` (annotated markup for an LMLM, source text for a
    standard model), each scored from an end-of-text token as the model saw documents in training.

    Documents longer than the context are cut into windows that overlap by one token, so every token
    is predicted exactly once. With ``lookup_calls`` the LMLM loss mask applies; the normaliser is
    always the token count of the call-free text (``markup.strip``).
    """
    device = next(model.parameters()).device
    special = lookup_token_ids(tokenizer) if lookup_calls else None
    T = context_length or context_length_of(model)
    eos = tokenizer.eos_token_id
    docs = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    sources = tokenizer([strip(t) for t in texts], add_special_tokens=False)["input_ids"]
    windows = []
    for ids in docs:
        seq = torch.tensor([eos, *ids])
        mask = loss_mask(seq, special)
        for start in range(0, max(len(seq) - 1, 1), T - 1):
            windows.append((seq[start:start + T], mask[start:start + T]))
    windows.sort(key=lambda w: len(w[0]))  # similar lengths batched together: less padding
    was_training = model.training
    model.eval()
    nll_sum, trained = torch.zeros((), dtype=torch.float64), 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        width = len(batch[-1][0])
        ids = torch.full((len(batch), width), eos, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (w_ids, w_mask) in enumerate(batch):  # right padding is invisible to causal attention
            ids[row, :len(w_ids)], mask[row, :len(w_mask)] = w_ids, w_mask
        ids, mask = ids.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(input_ids=ids).logits
        s, n = masked_nll(logits, ids, mask)
        nll_sum += s.double().cpu()
        trained += int(n)
    model.train(was_training)
    return Perplexity(float(nll_sum), trained, sum(len(s) for s in sources))


def load_lmlm(path: str):
    """(model in eval mode, tokenizer) of a checkpoint folder that tasks.pretrain wrote."""
    from transformers import AutoModelForCausalLM

    from models.tokenizer import load_tokenizer
    from models.train import quiet_progress

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserInputError(f"checkpoint {path}: no config.json; pass a checkpoint-<step> folder that "
                             "`lmlm lmlm pretrain` (or python -m tasks.pretrain) wrote")
    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), load_tokenizer(path)
