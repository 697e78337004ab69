"""LMLM evaluation and flows: atomic facts and FActScore, cloze scoring, perplexity with the model's own
lookups, edits and unlearning through the warehouse, the LLM judge, and the pretraining -> evaluation
flows and `lmlm generate` end to end on a small synthetic corpus."""

import json
import math
import os
import random
import re

import pyarrow.parquet as pq
import pytest
import torch

from models.generate import GenerationResult
from schemas.errors import UserInputError
from schemas.markup import parse
from schemas.shards import TRIPLET_SCHEMA, rows_to_table, triplet_id
from lookup import UNKNOWN, ExactIndex, LookupDatabase, StoredFact
from tasks.evaluate_lmlm import ClozeProbe, exact_match, fill_own_lookups, perplexity_report, precision_at_1
from tasks.factscore import AtomicFact, extract_facts, factscore, judge_report, parse_judgement, sentence_facts
from tasks.ground_truth import GroundTruth, load_ground_truth

PEOPLE = ["Ada Vance", "Omar Reyes", "Lena Ortiz", "Paul Kim"]
CITIES = ["Port Ellen", "Lake Mira", "North Dale", "East Bay", "Fort Hale", "New Avon"]
JOBS = ["chemist", "painter", "surgeon", "attorney", "engineer", "poet"]
TRUTH = {"Ada Vance": ("Port Ellen", "chemist"), "Omar Reyes": ("Lake Mira", "painter"),
         "Lena Ortiz": ("North Dale", "surgeon"), "Paul Kim": ("East Bay", "poet")}


def call(e, r, v):
    return f"<|db_entity|> {e}<|db_relationship|> {r}<|db_return|> {v}<|db_end|>"


def doc(person, city, job):
    return f"{person} was born in{call(person, 'Birth City', city)} {city}. {person.split()[0]} worked as a" \
           f"{call(person, 'Occupation', job)} {job}."


def mini_truth() -> GroundTruth:
    facts = {p: {"Birth City": c, "Occupation": j} for p, (c, j) in TRUTH.items()}
    return GroundTruth(facts, {p: "person" for p in facts}, [(p, f"doc-{i}") for i, p in enumerate(facts)], {})


@pytest.fixture(scope="module")
def copier():
    """(model, tokenizer): a 2-layer GPT-2 LMLM that writes the call after "X was born in" / "worked as a"
    and copies whatever value the database returns, "unknown" included (its training values vary per document)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.lmlm import loss_mask
    from models.tokenizer import lookup_token_ids, train_tokenizer

    rng = random.Random(0)
    # each document opens after an end-of-text token, as pretraining packs them and normalized_perplexity scores
    # them; prompts to this model are document openings (document_start)
    docs = [f"<|endoftext|>{doc(p, rng.choice(CITIES + [UNKNOWN]), rng.choice(JOBS))}<|endoftext|>"
            for _ in range(8) for p in PEOPLE]
    tok = train_tokenizer(docs, vocab_size=400, min_frequency=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=96, n_embd=64, n_layer=2, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    special = lookup_token_ids(tok)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    x = torch.full((len(ids), max(map(len, ids))), tok.eos_token_id)
    keep = torch.zeros_like(x, dtype=torch.bool)
    for i, s in enumerate(ids):
        x[i, :len(s)], keep[i, :len(s)] = torch.tensor(s), loss_mask(torch.tensor(s), special)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(600):  # until it has learned the documents (~200 steps; how many depends on the CPU's kernels)
        loss = model(input_ids=x, labels=x.masked_fill(~keep, -100)).loss
        if loss.item() < 0.03:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval(), tok


# ----------------------------------------------------------------------------- atomic facts


def test_corpus_templates_recover_every_gold_fact_of_the_synthetic_bios(tmp_path):
    from schemas.configs import SyntheticCorpusConfig
    from tasks.synthetic import generate_corpus

    corpus = generate_corpus(SyntheticCorpusConfig(n_people=60, n_organisation_docs=0, n_city_docs=0,
                                                   n_no_fact_docs=0, seed=3), str(tmp_path))
    gt = load_ground_truth(corpus.ground_truth_dir)
    annotated = {r["doc_id"]: r["annotated_text"] for r in pq.read_table(corpus.annotated).to_pylist()}
    for person, doc_id in gt.people:
        ann = parse(annotated[doc_id])
        found = {f for s in re.split(r"(?<=[.!?])\s+", ann.text) for f in sentence_facts(s)}
        assert found == {(pc.call.relation, pc.call.value) for pc in ann.calls}, person
        assert found == set(gt.facts[person].items())  # a biography states all of its subject's facts


def test_bio_facts_come_from_calls_and_sentences_and_are_checked_against_the_truth():
    gt = mini_truth()
    text = (f" an American chemist.{call('Ada Vance', 'Birth City', 'Port Ellen')} She was born in Port Ellen."
            f" She married Bo Li. She worked in Fort Hale. She was born in Port Ellen."
            f" Her birthplace was{call('Ada Vance', 'Birth City', UNKNOWN)} unknown."
            f" She studied at{call('Ada Vance', 'Alma Mater', 'Gale Co')} Gale Co. Friends describe her as kind."
            " She majored in<|db_entity|> Ada Vance<|db_relationship|> Major")  # cut off mid-call
    facts = extract_facts("Ada Vance", "Tell me a bio of Ada Vance. Ada Vance is",
                          GenerationResult(text, "", []), gt)
    got = {(f.relation, f.value, f.source): f.supported for f in facts}
    assert got == {
        ("Occupation", "chemist", "text"): True,  # the prompt's "Ada Vance is" + " an American chemist."
        ("Birth City", "Port Ellen", "lookup"): True,  # the call, and its mention counted once
        ("Spouse", "Bo Li", "text"): False,
        ("Employer City", "Fort Hale", "text"): False,
        ("Alma Mater", "Gale Co", "lookup"): False,  # a lookup states a fact too, checked like any other
    }


def test_factscore_and_the_length_penalty_follow_the_paper():
    short = [True] * 4 + [False]  # 5 facts, 4 supported
    long = [True] * 9 + [False] * 3  # 12 facts: no penalty
    report = factscore([short, long, []], gamma=10)
    assert report["responses"] == 3 and report["responded"] == 2
    assert report["factscore"] == pytest.approx((0.8 + 0.75) / 2)
    assert report["factscore_length_penalty"] == pytest.approx((0.8 * math.exp(1 - 10 / 5) + 0.75) / 2)
    assert report["facts_per_response"] == pytest.approx(17 / 3)
    facts = [AtomicFact("Occupation", "poet", True, "text"), AtomicFact("Birth City", "X", False, "lookup")]
    assert factscore([facts])["factscore"] == 0.5
    assert factscore([[]])["factscore"] == 0.0  # nothing stated: no credit


def test_cloze_exact_match_and_precision_at_1():
    assert exact_match(" March 3, 1950. She later", "March 3, 1950")
    assert exact_match(" a quiet day, on March 3, 1950.", "March 3, 1950")  # starts at word 5
    assert not exact_match(" a very quiet day, on March 3, 1950.", "March 3, 1950")  # starts at word 6
    assert not exact_match(" March 3, 1951.", "March 3, 1950")
    assert precision_at_1(" a chemist at Labs.", "chemist")  # the article is skipped
    assert precision_at_1(" The Smith Prize.", "The Smith Prize")
    assert not precision_at_1(" Labs, as a chemist.", "chemist")
    assert not precision_at_1("", "chemist")


# ----------------------------------------------------------------------------- model-based metrics


def test_own_lookups_put_the_database_answer_to_the_models_key_into_each_call(copier):
    model, tok = copier
    gold = [doc(p, *TRUTH[p]) for p in PEOPLE[:2]]
    right = ExactIndex(LookupDatabase([StoredFact(p, r, v) for p, vs in mini_truth().facts.items() for r, v in vs.items()]))
    same = fill_own_lookups(model, tok, gold, right)
    assert same.texts == gold and same.calls == 4 and same.value_accuracy == 1.0
    facts = [f for f in right.db.facts.values() if (f.entity, f.relation) != ("Ada Vance", "Birth City")]
    moved = LookupDatabase([*facts, StoredFact("Ada Vance", "Birth City", "Fort Hale")])  # one value changed
    own = fill_own_lookups(model, tok, gold, ExactIndex(moved))
    assert "Birth City<|db_return|> Fort Hale<|db_end|> Port Ellen." in own.texts[0]  # the mention stays the source's
    assert own.texts[1] == gold[1]
    assert 0.5 <= own.value_accuracy <= 0.75
    oracle = perplexity_report(model, tok, gold, "lmlm", right)
    assert oracle["oracle"] == pytest.approx(oracle["own_lookups"])  # a perfect database changes nothing
    wrong = perplexity_report(model, tok, gold, "lmlm", ExactIndex(moved))
    assert wrong["oracle"] == pytest.approx(oracle["oracle"])
    assert wrong["own_lookups"] > wrong["oracle"]  # mentions no longer match the looked-up values


@pytest.fixture()
def warehouse_file(tmp_path):
    from warehouse import db

    rows = [dict(triplet_id=triplet_id(f"doc-{i}", 10, p, r, v, "gold"), doc_id=f"doc-{i}", entity=p, relation=r,
                 value=v, call_offset=10, annotator="gold", annotator_version="1", run_id="r")
            for i, (p, vs) in enumerate(mini_truth().facts.items()) for r, v in vs.items()]
    pq.write_table(rows_to_table(rows, TRIPLET_SCHEMA), tmp_path / "triplets.parquet")
    path = str(tmp_path / "warehouse.duckdb")
    con = db.connect(path)
    db.load_triplets(con, [str(tmp_path / "triplets.parquet")], "r")
    con.close()
    return path


def test_edits_and_deletes_show_without_retraining_and_leave_the_warehouse_alone(copier, warehouse_file):
    from warehouse import db
    from tasks.evaluate_lmlm import edit_report

    model, tok = copier
    gt = mini_truth()
    probes = [ClozeProbe(p, "Birth City", f"{p} was born in", TRUTH[p][0]) for p in PEOPLE]
    report = edit_report(model, tok, warehouse_file, probes, gt, lookup_mode="exact", max_new_tokens=24,
                         batch_size=3, seed=0, document_start=True)
    assert report["known_before"] == 4
    assert report["edit_success"] == 1.0 and report["unlearning"] == 1.0
    con = db.connect(warehouse_file, read_only=True)
    try:
        assert con.execute("select count(*) from fact_edits").fetchone()[0] == 0  # edits went to a copy
    finally:
        con.close()


# ----------------------------------------------------------------------------- LLM judge


def test_llm_judge_factscore_against_an_openai_compatible_server(monkeypatch):
    from openai_server import Reply, serve

    from schemas.configs import EndpointConfig

    def script(body, n):
        user = body["messages"][-1]["content"]
        assert "Ada Vance / Birth City: Port Ellen" in user  # the knowledge source goes with the bio
        return Reply(content=json.dumps({"facts": [{"fact": "born in Port Ellen", "supported": True},
                                                   {"fact": "a painter", "supported": "Ada" not in user}]}))

    records = [{"entity": p, "prompt": f"Tell me a bio of {p}. {p} is", "text_without_calls": " a chemist."}
               for p in ("Ada Vance", "Ada Vance")]
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with serve(script) as server:
        ep = EndpointConfig(base_url=server.base_url, model="judge", api_key_env="JUDGE_KEY")
        report = judge_report(records, mini_truth(), ep, gamma=10)
        assert [r.authorization for r in server.chat_requests()] == ["Bearer sk-test"] * 2
    assert report["factscore"] == 0.5 and report["facts_per_response"] == 2 and report["failed"] == 0
    assert parse_judgement('```json\n{"facts": [{"supported": false}]}\n```') == [False]
    assert parse_judgement("no json here") == []
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(UserInputError, match="JUDGE_KEY is not set"):
        judge_report(records, mini_truth(), ep, gamma=10)
    closed = EndpointConfig(base_url=server.base_url, model="judge", api_key_env="", max_attempts=1, timeout_s=2)
    with pytest.raises(UserInputError, match="cannot connect"):
        judge_report(records, mini_truth(), closed, gamma=10)


# ----------------------------------------------------------------------------- flows and CLI


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir laid out as `lmlm run` leaves it: report.json, annotated shards, warehouse, ground truth."""
    from warehouse import db
    from schemas.configs import SyntheticCorpusConfig
    from tasks.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("lmlm-workdir")
    corpus = generate_corpus(SyntheticCorpusConfig(n_people=40, n_organisation_docs=4, n_city_docs=2,
                                                   n_no_fact_docs=2), str(root / "synthetic"))
    con = db.connect(str(root / "warehouse.duckdb"))
    db.load_triplets(con, [corpus.triplets], "gold")
    con.close()
    annotated = os.path.dirname(corpus.annotated)
    (root / "report.json").write_text(json.dumps({"shards": {"annotated": annotated},
                                                  "warehouse": str(root / "warehouse.duckdb")}))
    return root


@pytest.fixture(scope="module")
def flows_run(workdir, prefect_harness):  # about a minute: a Prefect server, two training processes, evaluation
    from flows.lmlm import lmlm_evaluation, lmlm_pretraining
    from schemas.lmlm_configs import LMLMEvaluationConfig, LMLMFlowConfig

    config = LMLMFlowConfig(
        workdir=str(workdir), annotated_shards=[str(workdir / "synthetic" / "ground_truth" / "annotated.parquet")],
        pretrain=dict(model="micro", vocab_size=400, context_length=64, batch_size=2, max_steps=4, warmup_steps=1,
                      eval_every=2, checkpoint_every=4, eval_docs=4, holdout_fraction=0.2, bf16=False),
        evaluation=LMLMEvaluationConfig(perplexity_docs=3, bio_people=3, bio_max_new_tokens=16, cloze_probes=5,
                                        cloze_max_new_tokens=8, edit_facts=3, batch_size=4))
    return config, lmlm_pretraining(config), lmlm_evaluation(config)


@pytest.mark.slow
def test_pretraining_trains_both_variants_on_equal_terms_with_one_loss_plot(flows_run):
    config, pre, _ = flows_run
    lmlm, std = pre["variants"]["lmlm"], pre["variants"]["standard"]
    assert lmlm["parameters"] == std["parameters"] and lmlm["tokens"] == std["tokens"] == 4 * 2 * 64
    assert os.path.isfile(os.path.join(lmlm["checkpoint"], "model.safetensors"))
    with open(pre["loss_curves"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(pre["out_dir"], "lmlm", "train.log"))  # trained in a process of its own


@pytest.mark.slow
def test_evaluation_reports_both_variants_side_by_side(flows_run):
    config, _, ev = flows_run
    assert set(ev["variants"]) == {"lmlm", "standard"}
    metrics = {r["metric"]: r for r in ev["comparison"]}
    for name in ("normalized perplexity (oracle lookups)", "normalized perplexity (own lookups)", "FActScore",
                 "FActScore, length penalty", "cloze exact match", "cloze precision@1", "edit success", "unlearning"):
        assert set(metrics[name]) == {"metric", "lmlm", "standard"}, name
    lm = ev["variants"]["lmlm"]
    assert lm["perplexity"]["docs"] == 3 and lm["perplexity"]["own_lookups"] > 1
    assert lm["bios"]["responses"] == 3 and len(lm["bio_samples"]) == 3 and lm["cloze"]["probes"] == 5
    assert ev["variants"]["standard"]["edits"]["edit_success"] == 0.0  # nothing to edit without a database
    on_disk = json.loads(open(ev["report"]).read())
    assert on_disk["comparison"] == ev["comparison"]


def test_generate_cli_answers_lookups_from_the_warehouse_with_or_without_markup(copier, warehouse_file, tmp_path,
                                                                                capsys):
    from flows.cli import main
    from models.tokenizer import save_tokenizer

    model, tok = copier
    checkpoint = str(tmp_path / "checkpoint")
    model.save_pretrained(checkpoint)
    save_tokenizer(tok, checkpoint)
    base = ["--model", checkpoint, "--db", warehouse_file, "--max-new-tokens", "30", "--document-start"]
    assert main(["generate", "Ada Vance was born in", "Lena Ortiz was born in", *base]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Ada Vance was born in Port Ellen.") and "Lena Ortiz was born in North Dale." in out
    assert "<|db_" not in out
    assert main(["generate", "Ada Vance was born in", *base, "--show-calls"]) == 0
    assert "<|db_entity|> Ada Vance<|db_relationship|> Birth City<|db_return|> Port Ellen<|db_end|> Port Ellen" \
        in capsys.readouterr().out
    assert main(["generate", "Ada Vance was born in", *base, "--cite"]) == 0
    cited = capsys.readouterr().out
    assert cited.startswith("Ada Vance was born in Port Ellen[1].") and "[1] Ada Vance / Birth City -> Port Ellen: doc-0" in cited


def test_bad_input_ends_in_one_clear_line(workdir, tmp_path, capsys):
    from flows.cli import main
    from flows.lmlm import annotated_shards
    from flows.lmlm_cli import _flow_config
    from schemas.lmlm_configs import LMLMFlowConfig

    assert main(["generate", "--model", str(tmp_path)]) == 2
    assert "no prompt given" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err
    with pytest.raises(UserInputError, match="run `lmlm run"):
        annotated_shards(LMLMFlowConfig(workdir=str(tmp_path)))
    with pytest.raises(UserInputError, match="no annotated .parquet shards"):
        annotated_shards(LMLMFlowConfig(workdir=str(tmp_path), annotated_shards=[str(tmp_path / "none")]))
    with pytest.raises(UserInputError, match="ground truth .*kb.parquet"):
        load_ground_truth(str(tmp_path))

    class Args:
        workdir, config, token_budget, model, max_steps = str(workdir), None, -5, None, None

    with pytest.raises(UserInputError, match="pretrain.token_budget"):
        _flow_config(Args())
    Args.token_budget = 1000
    cfg = _flow_config(Args())
    assert cfg.pretrain.token_budget == 1000 and cfg.pretrain.context_length == 256  # on top of the demo's defaults
