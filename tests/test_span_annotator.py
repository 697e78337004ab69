"""The encoder annotator: windows that cover long documents, whole-word spans, training that learns the seed's
calls, output that strips back to the source, checkpoints that load back, and bulk annotation through the shard
machinery."""

import pyarrow.parquet as pq
import pytest
import torch

from models.span_annotator import (
    SpanAnnotatorConfig,
    build_span_annotator,
    detokenize,
    load_span_annotator,
    save_span_annotator,
)
from models.span_annotator_decode import (
    AnnotateOptions,
    AnnotateStats,
    annotate_texts,
    bio_viterbi,
    endable_positions,
    heading,
    whole_heading,
)
from models.span_annotator_finetune import collate, train_span_annotator
from models.span_examples import build_examples, call_targets, encode_texts, snap_to_words, windows_of
from schemas import markup
from test_annotator_model import FACTS, TEXTS, annotated

torch.set_num_threads(1)
DOCS = [annotated(t, f) for t, f in zip(TEXTS, FACTS)]


def triplets(docs):
    return sorted((k, pc.call.entity, pc.call.relation, pc.call.value) for k, d in enumerate(docs) for pc in d.calls)


@pytest.fixture(scope="module")
def trained():
    """MiniLM fine-tuned until it has memorised the test documents' calls."""
    torch.manual_seed(0)
    model, tok, names = build_span_annotator(None, [pc.call.relation for d in DOCS for pc in d.calls])
    train_span_annotator(model, build_examples(tok, DOCS, model.cfg), epochs=60, batch_tokens=512, lr=3e-4,
                         head_lr=3e-3, warmup_steps=5, bf16=False, log=lambda m: None,
                         name_rows=names.name_rows(tok, model.cfg.max_relation_tokens))
    return model, tok, names


def test_windows_cover_a_long_document_once_and_repeat_its_head():
    cfg = SpanAnnotatorConfig(window=40, head_tokens=6, overlap=8)
    ids = list(range(1000, 1150))
    wins = windows_of(0, ids, cfg, cls=101, sep=102)
    assert len(wins) > 3 and all(len(w.ids) <= cfg.window for w in wins)
    assert [w.core for w in wins][0][0] == 0 and wins[-1].core[1] == len(ids)
    assert all(a.core[1] == b.core[0] for a, b in zip(wins, wins[1:]))  # cores partition the document
    for w in wins:
        shown = {p for p in w.pos if p >= 0}
        assert set(range(*w.core)) <= shown  # a window shows every token it is responsible for
        assert all(w.ids[k] == ids[p] for k, p in enumerate(w.pos) if p >= 0)
        assert w is wins[0] or set(range(6)) <= shown  # later windows start with the document's head
    assert windows_of(0, ids[:30], cfg, 101, 102)[0].ids == [101, *ids[:30], 102]


def test_spans_snap_to_whole_words():
    text = "Bertie Mee was appointed in 1966."
    assert snap_to_words(text, 9, 10) == (7, 10)  # "ee" -> "Mee"
    assert snap_to_words(text, 2, 9) == (0, 10)
    assert text[slice(*snap_to_words(text, 27, 29))] == "1966"
    assert snap_to_words(text, 6, 8) == (7, 10)  # leading space trimmed


def test_training_targets_locate_values_and_entities_in_the_text():
    model, tok, _ = build_span_annotator(None, ["Birth City"])
    enc = encode_texts(tok, [DOCS[0].text])[0]
    targets = call_targets(DOCS[0], enc)
    assert len(targets) == len(DOCS[0].calls)
    first = targets[0]
    a, b = first.value
    assert DOCS[0].text[enc.offsets[a][0]:enc.offsets[b][1]] == "Tampere"
    assert first.entity and DOCS[0].text[enc.offsets[first.entity[0][0]][0]:enc.offsets[first.entity[0][1]][1]] == "Ada Varga"
    assert detokenize(tok, tok("Annie (2014) co-founder", add_special_tokens=False)["input_ids"]) == "annie (2014) co-founder"


def test_value_tags_are_decoded_as_the_most_likely_valid_bio_sequence():
    """Per-token argmax would read B O I as two values ("New" and "Connecticut"); the most likely sequence where an
    I continues a B or I on the same line reads one. An I never starts a value, never crosses a line, and positions
    outside the window's body stay O."""
    p = torch.tensor([[[0.1, 0.6, 0.3], [0.45, 0.15, 0.4], [0.25, 0.15, 0.6]]]).log()  # rows: O, B, I probabilities
    assert p.argmax(-1).tolist() == [[1, 0, 2]]
    everywhere = torch.ones((1, 3), dtype=torch.bool)
    assert bio_viterbi(p, torch.tensor([[1, 1, 1]]), everywhere).tolist() == [[1, 2, 2]]
    assert bio_viterbi(p, torch.tensor([[1, 2, 2]]), everywhere).tolist() == [[1, 0, 0]]  # a line break after "New"
    assert bio_viterbi(p, torch.tensor([[1, 1, 1]]), torch.tensor([[False, True, True]])).tolist() == [[0, 0, 0]]
    stray = torch.tensor([[[0.3, 0.1, 0.6]]]).log()  # an I with nothing before it to continue
    assert bio_viterbi(stray, torch.tensor([[1]]), torch.ones((1, 1), dtype=torch.bool)).tolist() == [[0]]


def test_a_value_never_ends_on_a_dangling_word_or_inside_a_hyphenated_word():
    """Where the tagger would stop a value on a comma, a preposition or the first half of a hyphenated word ("May
    11," of "May 11, 1751", "Bank of", "four" of "four-year"), the decoder takes the most likely value that ends on
    a whole word: the longer one or the shorter one, whichever the tags make more likely."""
    text = "Born May 11, 1751 at the Bank of Boston for a four-year term."
    _, tok, _ = build_span_annotator(None, ["Birth Date"])
    enc = encode_texts(tok, [text])[0]
    w = windows_of(0, enc.ids, SpanAnnotatorConfig(), tok.cls_token_id, tok.sep_token_id)[0]
    piece = {text[slice(*enc.offsets[p])]: k for k, p in enumerate(w.pos) if p >= 0}
    endable = endable_positions(w, enc, text)
    assert not endable[piece[","]] and not endable[piece["of"]] and not endable[piece["four"]] and not endable[piece["-"]]
    assert endable[piece["1751"]] and endable[piece["Boston"]] and endable[piece["year"]] and endable[0]

    def value(tags: dict[str, list[float]]) -> tuple[str, str]:
        """The value decoded without and with the end rule, from O/B/I probabilities of some pieces (others: O)."""
        T = len(w.ids)
        p = torch.tensor([0.96, 0.02, 0.02]).repeat(1, T, 1)
        for word, probs in tags.items():
            p[0, piece[word]] = torch.tensor(probs)
        everywhere, lines = torch.ones((1, T), dtype=torch.bool), torch.ones((1, T), dtype=torch.long)
        out = []
        for rule in (None, torch.tensor([endable])):
            k = [k for k, t in enumerate(bio_viterbi(p.log(), lines, everywhere, rule)[0].tolist()) if t]
            out.append(text[enc.offsets[w.pos[k[0]]][0]:enc.offsets[w.pos[k[-1]]][1]] if k else "")
        return tuple(out)

    B, I, O_or_I = [0.02, 0.96, 0.02], [0.02, 0.02, 0.96], [0.55, 0.02, 0.43]
    assert value({"May": B, "11": I, ",": I, "1751": O_or_I}) == ("May 11,", "May 11, 1751")
    assert value({"four": B, "-": O_or_I, "year": O_or_I}) == ("four", "four-year")
    assert value({"Bank": B, "of": I, "Boston": [0.97, 0.02, 0.01]}) == ("Bank of", "Bank")


def test_an_entity_inside_the_pages_title_line_is_widened_to_the_whole_title():
    text = "Ireland at the 2014 European Athletics Championships\n\nIreland competed at the 2014 championships."
    title = "Ireland at the 2014 European Athletics Championships"
    part = text.index("European")
    assert text[slice(*whole_heading(heading(text), part, part + 8))] == title
    assert text[slice(*whole_heading(heading(text), 54, 61))] == "Ireland"  # a mention in the body stays as it is
    assert heading("Matter: Matter should not be confused with mass.") is None  # no title line
    assert heading("First line\nsecond line\n\nbody") is None  # a paragraph, not a title
    assert heading(title + " " * 100 + "\n\nbody") is None  # too long to be a title
    assert heading("Edward Villa is a prosecutor who was born in Kevinland.\n\nHe ...") is None  # a short paragraph


def test_relation_grad_sets_how_much_the_relation_loss_trains_the_encoder():
    """relation_grad 0: the relation decoder reads the encoder without training it; 0.3: the encoder's gradient from
    the relation loss is 0.3 x the full one (the forward pass, and so the loss, is the same)."""
    loss, grad = {}, {}
    for g in (0.0, 0.3, 1.0):
        torch.manual_seed(0)
        model, tok, _ = build_span_annotator(None, [pc.call.relation for d in DOCS for pc in d.calls],
                                             SpanAnnotatorConfig(relation_grad=g, dropout=0.0))
        index = {int(t): k for k, t in enumerate(model.relation_vocab.tolist())}
        losses = model(collate(build_examples(tok, DOCS, model.cfg), index, "cpu"))
        losses["relation"].backward()
        loss[g], grad[g] = float(losses["relation"].detach()), model.encoder.encoder.layer[-1].output.dense.weight.grad
    assert loss[0.0] == pytest.approx(loss[1.0]) and loss[0.3] == pytest.approx(loss[1.0])
    assert grad[0.0] is None or not grad[0.0].any()
    assert grad[1.0].abs().sum() > 0 and torch.allclose(grad[0.3], 0.3 * grad[1.0], rtol=1e-4, atol=1e-9)


def test_fine_tuned_model_writes_the_seed_calls_and_preserves_the_source(trained):
    model, tok, names = trained
    stats = AnnotateStats()
    out = annotate_texts(model, tok, names, [d.text for d in DOCS], stats=stats)
    assert [markup.strip(markup.render(a)) for a in out] == [d.text for d in DOCS]
    assert [a.text for a in out] == TEXTS
    # relation names (the seed's spelling) and values; entities where the seed's entity is in the text (an
    # extractive model points at a mention: "Matsue café" is never written as such)
    assert [(k, r, v) for k, _, r, v in triplets(out)] == [(k, r, v) for k, _, r, v in triplets(DOCS)]
    pointable = {k for k, d in enumerate(DOCS) if all(pc.call.entity in d.text for pc in d.calls)}
    assert [t for t in triplets(out) if t[0] in pointable] == [t for t in triplets(DOCS) if t[0] in pointable]
    assert stats.documents == len(DOCS) and stats.calls == len(triplets(DOCS))


@pytest.mark.parametrize("relation", ["seed", "generate"])
def test_relation_names_come_from_the_seed_scorer_or_the_decoder(trained, relation):
    """Both ways of naming a call's relation learn the seed's names: the scorer picks one of them, the decoder
    writes one word piece by word piece (and could write a name the seed never used)."""
    model, tok, names = trained
    out = annotate_texts(model, tok, names, [d.text for d in DOCS], AnnotateOptions(relation=relation))
    assert [(k, r, v) for k, _, r, v in triplets(out)] == [(k, r, v) for k, _, r, v in triplets(DOCS)]


def test_name_scorer_ranks_the_seed_names_by_the_calls_context(trained):
    """The table holds one unit vector per seed name; the call's own relation scores highest among them."""
    model, tok, names = trained
    assert sorted(names.names[c] for c in names.candidates) == sorted({pc.call.relation for d in DOCS for pc in d.calls})
    assert torch.allclose(model.name_table.float().norm(dim=-1), torch.ones(len(names.candidates)), atol=1e-2)
    batch = collate(build_examples(tok, DOCS, model.cfg), {}, "cpu", names.name_rows(tok, model.cfg.max_relation_tokens))
    assert (batch["name"] >= 0).all()  # every training call's relation has its row
    with torch.inference_mode():
        h = model.encode(batch["ids"], batch["mask"]).to(model.name_table.dtype)
        scores = model.name_logits(model.name_features(h, batch["ids"], batch["win"], batch["v_first"],
                                                       batch["v_last"], batch["e_first"], batch["e_last"]))
    assert (scores.argmax(-1) == batch["name"]).float().mean() > 0.9


def test_a_checkpoint_from_before_the_name_scorer_still_loads_and_generates_names(trained, tmp_path):
    import json
    import os

    from safetensors.torch import load_file, save_file

    model, tok, names = trained
    path = save_span_annotator(model.float(), tok, names, str(tmp_path / "model"), {"version": "old"})
    heads = {k: v for k, v in load_file(os.path.join(path, "heads.safetensors")).items() if not k.startswith("name_")}
    save_file(heads, os.path.join(path, "heads.safetensors"))
    meta = json.load(open(os.path.join(path, "annotator.json")))
    del meta["relation_names"]["candidates"]
    json.dump(meta, open(os.path.join(path, "annotator.json"), "w"))
    old, tok2, names2, _ = load_span_annotator(path, "cpu")
    assert old.name_table.shape[0] == 0
    out = annotate_texts(old, tok2, names2, [d.text for d in DOCS])  # relation: seed, but there is no scorer
    expected = annotate_texts(model, tok, names, [d.text for d in DOCS], AnnotateOptions(relation="generate"))
    assert out == expected


def test_a_page_that_opens_with_a_title_line_names_its_title_as_every_facts_entity(trained):
    """By default (on real text the pointer lost to the title) a document with a title line gets its title as each
    call's entity; subject_margin None leaves the choice to the pointer; a text without a title line is the pointer's
    either way."""
    model, tok, names = trained
    text = "Chiara Lindqvist\n\n" + TEXTS[1]  # Bruno's facts under another page's title
    titled = annotate_texts(model, tok, names, [text])[0]
    pointer = annotate_texts(model, tok, names, [text], AnnotateOptions(subject_margin=None))[0]
    assert [pc.call.value for pc in titled.calls] == [pc.call.value for pc in pointer.calls] == \
        ["physics", "Ghent University", "Elif Moreau"]
    assert {pc.call.entity for pc in titled.calls} == {"Chiara Lindqvist"}
    assert {pc.call.entity for pc in pointer.calls} == {"Bruno Okonkwo"}
    untitled = [d.text for d in DOCS]
    assert annotate_texts(model, tok, names, untitled) == \
        annotate_texts(model, tok, names, untitled, AnnotateOptions(subject_margin=None))


def test_continue_bias_makes_values_longer(trained):
    model, tok, names = trained
    texts = [d.text for d in DOCS]
    length = {b: sum(len(pc.call.value) for a in annotate_texts(model, tok, names, texts, AnnotateOptions(continue_bias=b))
                     for pc in a.calls) for b in (0.0, 12.0)}
    assert length[12.0] > length[0.0]


def test_long_documents_are_annotated_in_windows_and_merged(trained):
    model, tok, names = trained
    long_text = " ".join(TEXTS[:3] * 6)  # ~250 word pieces: several 64-token windows
    model.cfg.window, model.cfg.head_tokens, model.cfg.overlap = 64, 8, 16
    try:
        got = annotate_texts(model, tok, names, [long_text])[0]
    finally:
        model.cfg.window, model.cfg.head_tokens, model.cfg.overlap = SpanAnnotatorConfig().window, 32, 64
    assert markup.strip(markup.render(got)) == long_text
    offsets = [pc.offset for pc in got.calls]
    assert len(offsets) == len(set(offsets))  # overlapping windows do not repeat a call
    assert max(offsets) > len(long_text) * 3 // 4  # the last window's values are found too


def test_checkpoint_loads_back_and_annotates_the_same(trained, tmp_path):
    model, tok, names = trained
    path = save_span_annotator(model.float(), tok, names, str(tmp_path / "model"), {"version": "test-v1"})
    before = annotate_texts(model, tok, names, [d.text for d in DOCS])
    model2, tok2, names2, meta = load_span_annotator(path, "cpu")
    assert meta["version"] == "test-v1"
    assert annotate_texts(model2, tok2, names2, [d.text for d in DOCS]) == before


def test_a_loaded_checkpoint_trains_its_name_scorer_on_every_call(trained, tmp_path):
    """Fine-tuning a saved checkpoint again gives the scorer the same targets as the first fine-tune: every training
    call's relation has its row in the loaded name table; training without the targets is refused, not silent."""
    model, tok, names = trained
    path = save_span_annotator(model.float(), tok, names, str(tmp_path / "model"), {"version": "again"})
    model2, tok2, names2, _ = load_span_annotator(path, "cpu")
    longest = model2.cfg.max_relation_tokens
    assert names2.name_rows(tok2, longest) == names.name_rows(tok, longest)
    examples = build_examples(tok2, DOCS, model2.cfg)
    batch = collate(examples, {}, "cpu", names2.name_rows(tok2, longest))
    assert len(batch["name"]) == sum(len(d.calls) for d in DOCS) and (batch["name"] >= 0).all()
    with pytest.raises(ValueError, match="name_rows"):
        train_span_annotator(model2, examples, epochs=1, log=lambda m: None)


def test_bulk_annotation_uses_an_encoder_checkpoint_per_shard(trained, tmp_path):
    from schemas.configs import BulkAnnotationConfig
    from tasks.bulk import bulk_annotate_shard
    from test_bulk import write_doc_shards

    model, tok, names = trained
    checkpoint = save_span_annotator(model.float(), tok, names, str(tmp_path / "model"), {"version": "enc-test-v1"})
    shard = write_doc_shards(tmp_path, 1)[0]
    cfg = BulkAnnotationConfig(device="cpu", threads=1)
    first = bulk_annotate_shard(shard, cfg, checkpoint, str(tmp_path / "bulk"), "run-1", str(tmp_path / "cache"))
    assert not first.skipped and first.annotated == first.docs == 3 and first.calls > 0
    rows = pq.read_table(first.annotated_shard).to_pylist()
    assert all(markup.strip(r["annotated_text"]) == r["text"] for r in rows)
    # the model's version and the decoder's revision: a decoder that writes other calls annotates the shard again
    assert {(r["annotator"], r["annotator_version"]) for r in rows} == {("lmlm-encoder-annotator", "enc-test-v1;decoder=2")}
    assert pq.read_table(first.triplet_shard).num_rows == first.calls
    again = bulk_annotate_shard(shard, cfg, checkpoint, str(tmp_path / "bulk"), "run-2", str(tmp_path / "cache"))
    assert again.skipped
    # other decoding settings write other calls: the shard is annotated again, under its own version
    cfg = BulkAnnotationConfig(device="cpu", threads=1, entity="pointer", relation="generate")
    other = bulk_annotate_shard(shard, cfg, checkpoint, str(tmp_path / "bulk"), "run-3", str(tmp_path / "cache"))
    assert not other.skipped
    assert {r["annotator_version"] for r in pq.read_table(other.annotated_shard).to_pylist()} == \
        {"enc-test-v1;decoder=2;subject_margin=None;relation=generate"}
