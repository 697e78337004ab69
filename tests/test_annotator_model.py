"""The small annotator: training format, source-preserving decoding, chunked == step-by-step, checkpoints."""

import json
import os

import pytest
import torch

from models.annotator import (
    build_examples,
    load_annotator,
    prompt_ids,
    save_annotator,
    segment_bounds,
    split_annotated,
    target_ids,
)
from models.annotator_decode import DecodeOptions, DecodeStats, annotate_texts, decode_call
from models.annotator_finetune import finetune
from models.tokenizer import lookup_token_ids, train_tokenizer
from schemas import markup

torch.set_num_threads(1)

TEXTS = [
    "Ada Varga was born in Tampere in 1931. Later Ada worked for Nordic Rail for many years.",
    "Bruno Okonkwo studied physics at Ghent University. He married Elif Moreau in 1960.",
    "Chiara Lindqvist (born 4 May 1902, Kraków) was a painter of the Bergamo school.",
    "The café in Matsue served crêpes — naïve Ünïcödé text: 東京 and emoji 🙂 too.",
    "Short.",
]
FACTS = [
    [("Ada Varga", "Birth City", "Tampere"), ("Ada Varga", "Birth Year", "1931"), ("Ada Varga", "Employer", "Nordic Rail")],
    [("Bruno Okonkwo", "Major", "physics"), ("Bruno Okonkwo", "University", "Ghent University"),
     ("Bruno Okonkwo", "Spouse", "Elif Moreau")],
    [("Chiara Lindqvist", "Birth Date", "4 May 1902"), ("Chiara Lindqvist", "Occupation", "painter")],
    [("Matsue café", "Dish", "crêpes")],
    [],
]


def annotated(text, facts):
    from tasks.align import call_offset

    calls = []
    for e, r, v in facts:
        calls.append(markup.PlacedCall(call_offset(text, text.index(v)), markup.LookupCall(e, r, v)))
    return markup.Annotated(text, tuple(sorted(calls, key=lambda c: c.offset)))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 20, 400)


def tiny_model(tokenizer, seed=0, entity_bias=0.0):
    """A random-init Llama; ``entity_bias`` makes it open calls often (exercises every decoding path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                         max_position_embeddings=512, tie_word_embeddings=False,
                                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)).eval()
    if entity_bias:
        with torch.no_grad():
            head = model.get_output_embeddings()
            head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
            ids = lookup_token_ids(tokenizer)
            head.bias[ids.entity] = entity_bias
            head.bias[ids.relationship] = entity_bias / 2
            head.bias[ids.ret] = entity_bias / 2
            head.bias[ids.end] = entity_bias / 2
    return model


@torch.no_grad()
def reference_decode(model, tokenizer, text, max_call_tokens=48, max_calls_at_position=3, max_calls_per_100_words=None):
    """The specification: step-by-step constrained greedy decoding, recomputing the whole sequence each
    step (no cache, no drafts, no batching), written as a plain loop over the grammar."""
    ids = lookup_token_ids(tokenizer)
    eos = tokenizer.eos_token_id
    banned = {1: {ids.entity, ids.ret, ids.end, eos}, 2: {ids.entity, ids.relationship, ids.end, eos},
              3: {ids.entity, ids.relationship, ids.ret, eos}}
    seq = prompt_ids(tokenizer, text)
    pos, blocked, calls, opened = 0, None, [], 0
    budget = None if max_calls_per_100_words is None else -(-max_calls_per_100_words * len(text.split()) // 100)
    while True:
        enc = tokenizer(text[pos:], add_special_tokens=False, return_offsets_mapping=True)
        src, offs = enc["input_ids"], enc["offset_mapping"]
        i, restarted = 0, False
        while i < len(src):
            char = pos + offs[i][0] if i == 0 or offs[i - 1][1] <= offs[i][0] else None
            if char is not None and 0 < char < len(text) and text[char - 1].isalnum() and text[char].isalnum():
                char = None  # a call never splits a word
            logits = model(torch.tensor([seq])).logits[0, -1]
            can_call = (char is not None and char != blocked and sum(c == char for c, _ in calls) < max_calls_at_position
                        and (budget is None or opened < budget))
            if not (can_call and logits[ids.entity] > logits[src[i]]):
                seq.append(src[i])
                i += 1
                continue
            call, state, opened = [ids.entity], 1, opened + 1
            while len(call) < max_call_tokens:
                logits = model(torch.tensor([seq + call])).logits[0, -1].clone()
                logits[list(banned[state])] = float("-inf")
                tok = int(logits.argmax())
                call.append(tok)
                state = {(1, ids.relationship): 2, (2, ids.ret): 3, (3, ids.end): 0}.get((state, tok), state)
                if state == 0:
                    break
            if state != 0:  # rolled back: no call here
                blocked = char
                continue
            seq += call
            calls.append((char, call))
            pos, blocked, restarted = char, None, True
            break
        if not restarted:
            return calls


def test_training_target_tokenizes_each_piece_alone(tokenizer):
    ann = annotated(TEXTS[0], FACTS[0])
    ids = lookup_token_ids(tokenizer)
    tgt = target_ids(tokenizer, ann)
    assert tgt[-1] == tokenizer.eos_token_id and tgt.count(ids.entity) == 3
    # stripped of its calls, the target is the source tokenization (calls sit at pre-token boundaries)
    plain, inside = [], False
    for t in tgt[:-1]:
        if t == ids.entity:
            inside = True
        if not inside:
            plain.append(t)
        if t == ids.end:
            inside = False
    assert plain == tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    ex = build_examples(tokenizer, [ann], 384)[0]
    assert ex.ids[:ex.n_prompt] == prompt_ids(tokenizer, TEXTS[0]) and ex.ids[ex.n_prompt:] == tgt


def test_decision_loss_weighs_each_source_token_against_opening_a_call(tokenizer):
    from models.annotator import decision_rivals

    ids = lookup_token_ids(tokenizer)
    ann = annotated(TEXTS[1], FACTS[1])
    seq = prompt_ids(tokenizer, ann.text) + target_ids(tokenizer, ann)
    n = len(prompt_ids(tokenizer, ann.text))
    rival = decision_rivals(seq, n, ids.entity, ids.end)
    assert rival[:n] == [-1] * n and rival[-1] == -1
    inside = False
    for k in range(n, len(seq) - 1):
        if seq[k] == ids.entity:
            after = seq.index(ids.end, k) + 1  # a call's rival: the source token that follows the call
            assert rival[k] == seq[after]
            inside = True
        elif inside:
            assert rival[k] == -1  # call tokens: full softmax
            inside = seq[k] != ids.end
        else:
            assert rival[k] == ids.entity


def test_long_documents_are_cut_into_segments_with_their_calls(tokenizer):
    text = " ".join(TEXTS[:3])
    ann = annotated(text, FACTS[0] + FACTS[1] + FACTS[2])
    bounds = segment_bounds(tokenizer, text, 24)
    assert len(bounds) > 1 and bounds[0][0] == 0 and bounds[-1][1] == len(text)
    assert all(a == b_prev for (_, b_prev), (a, _) in zip(bounds, bounds[1:]))
    parts = split_annotated(ann, bounds)
    assert sum(len(p.calls) for p in parts) == len(ann.calls)
    assert "".join(markup.render(p) for p in parts) == markup.render(ann)


# (5.0, 5): calls hit the limit mid-draft; cap 20: the calls-per-100-words budget runs out
@pytest.mark.parametrize("bias,max_call,cap", [(2.0, 8, None), (5.0, 5, None), (2.0, 8, 20.0)])
def test_chunked_batched_decoding_equals_step_by_step_constrained_greedy(tokenizer, bias, max_call, cap):
    model = tiny_model(tokenizer, seed=int(bias), entity_bias=bias)
    texts = [TEXTS[0][:60], TEXTS[2][:50], TEXTS[3], TEXTS[4]]  # multi-byte characters included
    expect = [reference_decode(model, tokenizer, t, max_call_tokens=max_call, max_calls_at_position=2,
                               max_calls_per_100_words=cap) for t in texts]
    assert any(expect), "the model should open some calls, or the test exercises nothing"
    if cap:  # the budget binds: fewer calls than without it
        free = [reference_decode(model, tokenizer, t, max_call_tokens=max_call, max_calls_at_position=2) for t in texts]
        assert sum(map(len, expect)) < sum(map(len, free))
    for opts in (DecodeOptions(chunk_tokens=1, draft_tokens=0, batch_size=1, max_call_tokens=max_call,
                               max_calls_at_position=2, max_calls_per_100_words=cap),
                 DecodeOptions(chunk_tokens=8, draft_tokens=4, batch_size=len(texts), max_call_tokens=max_call,
                               max_calls_at_position=2, max_calls_per_100_words=cap)):
        dec = annotate_texts(model, tokenizer, texts, opts)
        for text, want, got in zip(texts, expect, dec):
            assert markup.strip(markup.render(got.annotated)) == text  # the source is never altered
            wanted = []
            for char, call in want:
                try:
                    wanted.append((char, decode_call(tokenizer, call)))
                except markup.MarkupError:
                    pass
            assert [(pc.offset, pc.call) for pc in got.annotated.calls] == wanted
            for pc in got.annotated.calls:  # a call never splits a word, however eager the model
                assert not (0 < pc.offset < len(text) and text[pc.offset - 1].isalnum() and text[pc.offset].isalnum())


def test_compaction_keeps_decoding_exact(tokenizer):
    model = tiny_model(tokenizer, seed=3, entity_bias=2.5)
    texts = [" ".join(TEXTS[:3])] * 2 + TEXTS
    one = DecodeStats()
    base = annotate_texts(model, tokenizer, texts, DecodeOptions(chunk_tokens=16, batch_size=1, max_call_tokens=8), one)
    batched = DecodeStats()
    fast = annotate_texts(model, tokenizer, texts, DecodeOptions(chunk_tokens=16, batch_size=8, max_call_tokens=8),
                          batched)
    # calls themselves are covered by the step-by-step equality test above; this one checks that
    # documents of different lengths leaving the batch (compaction) change no output
    assert [d.annotated for d in fast] == [d.annotated for d in base]
    assert batched.forward_passes < one.forward_passes / 2  # documents share forward passes


def test_fine_tuned_model_learns_calls_and_checkpoint_loads_back(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    docs = [annotated(t, f) for t, f in zip(TEXTS, FACTS)]
    model = tiny_model(tokenizer).train()
    result = finetune(model, tokenizer, build_examples(tokenizer, docs, 384), epochs=60, batch_size=5, lr=1e-2,
                      min_lr=1e-3, warmup_steps=5, bf16=False, log=lambda m: None)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0] / 4
    out = annotate_texts(model, tokenizer, TEXTS[:3])
    got = {(pc.call.entity, pc.call.relation, pc.call.value) for d in out for pc in d.annotated.calls}
    assert len(got & {f for fs in FACTS[:3] for f in fs}) >= 5  # memorised its training documents
    path = save_annotator(model, tokenizer, str(tmp_path / "ckpt"), {"version": "test-v1", "max_source_tokens": 384})
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    assert AutoModelForCausalLM.from_pretrained(path) is not None
    loaded, tok2, meta = load_annotator(path, "cpu")
    assert meta["version"] == "test-v1"
    # lookup tokens stay single ids and survive skip_special_tokens (what vLLM's detokenizer does)
    ids = lookup_token_ids(tok2)
    assert markup.DB_ENTITY in tok2.decode([ids.entity], skip_special_tokens=True)
    assert json.load(open(os.path.join(path, "tokenizer_config.json"))).get("chat_template")
    again = annotate_texts(loaded, tok2, TEXTS[:3])
    assert [d.annotated for d in again] == [d.annotated for d in out]
