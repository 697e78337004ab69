"""Generation with live lookups: calls are answered from the database mid-generation with the KV
cache kept, batched output equals one-at-a-time output, the trie allows only database keys, and
a warehouse edit shows in the next generation without retraining."""

import pyarrow.parquet as pq
import pytest
import torch

from models.generate import cite, generate, generate_regenerate_per_lookup
from schemas.errors import UserInputError
from schemas.markup import DB_END, DB_ENTITY, DB_RETURN
from schemas.shards import TRIPLET_SCHEMA, rows_to_table, triplet_id
from lookup import UNKNOWN, ExactIndex, KeyTrie, LookupDatabase, StoredFact

# The tiny model learns these by heart, so it writes their calls itself.
DOCS = [
    "Ada Lovelace was born in<|db_entity|> Ada Lovelace<|db_relationship|> Birth Place<|db_return|> London<|db_end|>"
    " London. She worked with Charles Babbage on the engine.<|endoftext|>",
    "Alan Turing was born in<|db_entity|> Alan Turing<|db_relationship|> Birth Place<|db_return|> Maida Vale<|db_end|>"
    " Maida Vale. He studied at<|db_entity|> Alan Turing<|db_relationship|> Alma Mater<|db_return|> King's College"
    "<|db_end|> King's College.<|endoftext|>",
]
FACTS = [StoredFact("Ada Lovelace", "Birth Place", "Paris", 1, ("https://example.org/ada",)),
         StoredFact("Alan Turing", "Birth Place", "Maida Vale", 2, ("doc-7",)),
         StoredFact("Alan Turing", "Alma Mater", "King's College", 1, ("doc-7",))]


@pytest.fixture(scope="module")
def lm():
    """(model, tokenizer): a 2-layer GPT-2 that has memorised DOCS (a few seconds of training)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.tokenizer import train_tokenizer

    tok = train_tokenizer(DOCS * 4, vocab_size=320, min_frequency=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=160, n_embd=64, n_layer=2, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    x = torch.full((len(ids), max(map(len, ids))), tok.eos_token_id)
    mask = torch.zeros_like(x)
    for i, s in enumerate(ids):
        x[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(250):
        loss = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval(), tok


def test_a_call_the_model_writes_is_answered_from_the_database_and_cited(lm):
    model, tok = lm
    [r] = generate(model, tok, ["Ada Lovelace was"], ExactIndex(LookupDatabase(FACTS)), max_new_tokens=30)
    assert r.text.startswith(f" born in{DB_ENTITY} Ada Lovelace<|db_relationship|> Birth Place{DB_RETURN} Paris{DB_END}")
    [call] = r.lookups
    assert (call.entity, call.relation, call.value, call.hit, call.sources) == (
        "Ada Lovelace", "Birth Place", "Paris", True, ["https://example.org/ada"])
    assert r.text_without_calls.startswith(" born in") and DB_ENTITY not in r.text_without_calls
    assert "[1] Ada Lovelace / Birth Place -> Paris: https://example.org/ada" in cite(r)
    [hidden] = generate(model, tok, ["Ada Lovelace was"], ExactIndex(LookupDatabase(FACTS)), max_new_tokens=30,
                        show_calls=False)
    assert hidden.text == hidden.text_without_calls == r.text_without_calls


def test_a_key_missing_from_the_database_gets_unknown(lm):
    model, tok = lm
    [r] = generate(model, tok, ["Ada Lovelace was"], ExactIndex(LookupDatabase(FACTS[1:])), max_new_tokens=30)
    assert f"{DB_RETURN} {UNKNOWN}{DB_END}" in r.text
    assert [(c.value, c.hit) for c in r.lookups] == [(UNKNOWN, False)]
    assert "not in the database" in cite(r)


PROMPTS = [
    "Ada Lovelace was",
    "Alan Turing was born in<|db_entity|> Alan Turing<|db_relationship|> Birth Place<|db_return|>",  # lookup first
    "Alan",
    "She worked with",  # no call follows
    "Alan Turing was born in<|db_entity|> Alan Turing<|db_relationship|> Birth Place<|db_return|> Maida Vale<|db_end|>"
    " Maida Vale. He",
]


def test_batched_greedy_output_equals_one_prompt_at_a_time(lm):
    model, tok = lm
    index = ExactIndex(LookupDatabase(FACTS))
    batched = generate(model, tok, PROMPTS, index, max_new_tokens=40)
    single = [generate(model, tok, [p], index, max_new_tokens=40)[0] for p in PROMPTS]
    assert [(r.text, r.lookups, r.n_tokens) for r in batched] == [(r.text, r.lookups, r.n_tokens) for r in single]
    assert sum(len(r.lookups) for r in batched) >= 4  # the comparison covers lookups mid-batch
    assert batched[1].text.startswith(f" Maida Vale{DB_END}")  # the prompt's own call was answered


def test_regenerating_per_lookup_gives_the_same_output(lm):
    model, tok = lm
    index = ExactIndex(LookupDatabase(FACTS))
    kept = generate(model, tok, PROMPTS, index, max_new_tokens=40)
    again = generate_regenerate_per_lookup(model, tok, PROMPTS, index, max_new_tokens=40)
    assert [(r.text, r.lookups) for r in again] == [(r.text, r.lookups) for r in kept]


def test_token_budget_counts_values_but_never_cuts_one(lm):
    model, tok = lm
    index = ExactIndex(LookupDatabase(FACTS))
    longest_value = max(len(tok(" " + f.value)["input_ids"]) for f in FACTS) + 1
    for budget in (1, 5, 12):
        for prompt, r in zip(PROMPTS, generate(model, tok, PROMPTS, index, max_new_tokens=budget)):
            assert all(f"{DB_RETURN} {c.value}{DB_END}" in prompt + r.text for c in r.lookups)
            assert r.n_tokens <= budget + (longest_value if r.lookups else 0)
            assert DB_ENTITY not in r.text_without_calls and DB_END not in r.text_without_calls


def test_text_without_calls_drops_a_call_the_prompt_opened(lm):
    model, tok = lm
    [r] = generate(model, tok, [PROMPTS[1]], ExactIndex(LookupDatabase(FACTS)), max_new_tokens=12)
    assert r.text.startswith(f" Maida Vale{DB_END} Maida Vale")
    assert r.text_without_calls.startswith(" Maida Vale") and DB_END not in r.text_without_calls


def test_the_trie_lets_the_model_write_only_keys_in_the_database(lm):
    model, tok = lm
    db = LookupDatabase([StoredFact("Ada Lovelace", "Birth City", "Paris"),
                         StoredFact("Alan Turing", "Alma Mater", "King's")])
    prompt = ["Ada Lovelace was born in"]
    [free] = generate(model, tok, prompt, ExactIndex(db), max_new_tokens=25)
    assert free.lookups[0].relation == "Birth Place" and not free.lookups[0].hit  # not a key of db
    [constrained] = generate(model, tok, prompt, KeyTrie(db, tok), max_new_tokens=25)
    call = constrained.lookups[0]
    assert call.hit and (call.entity, call.relation) in {("Ada Lovelace", "Birth City"), ("Alan Turing", "Alma Mater")}


def test_sampling_is_repeatable_with_a_seed_and_top_k_1_is_greedy(lm):
    model, tok = lm
    index = ExactIndex(LookupDatabase(FACTS))
    a = generate(model, tok, PROMPTS, index, max_new_tokens=30, temperature=1.5, seed=3)
    b = generate(model, tok, PROMPTS, index, max_new_tokens=30, temperature=1.5, seed=3)
    assert [r.text for r in a] == [r.text for r in b]
    greedy = generate(model, tok, PROMPTS, index, max_new_tokens=30)
    top1 = generate(model, tok, PROMPTS, index, max_new_tokens=30, temperature=0.7, top_k=1, seed=1)
    assert [r.text for r in top1] == [r.text for r in greedy]


def test_bad_input_is_refused_with_one_clear_line(lm):
    model, tok = lm
    with pytest.raises(UserInputError, match="empty prompt"):
        generate(model, tok, ["Ada", ""], None)
    with pytest.raises(UserInputError, match="max_new_tokens 0"):
        generate(model, tok, ["Ada"], None, max_new_tokens=0)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["Ada Lovelace was born in London."] * 3, trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    with pytest.raises(UserInputError, match=r"<\|db_entity\|> encodes to \d+ ids"):
        generate(model, PreTrainedTokenizerFast(tokenizer_object=bpe), ["Ada"], None)


def test_a_warehouse_edit_shows_in_the_next_generation_without_retraining(lm, tmp_path):
    from warehouse.db import connect, load_triplets
    from warehouse.edits import edit_fact
    from warehouse.lookup_db import export_lookup_db

    model, tok = lm
    rows = [dict(triplet_id=triplet_id("wiki-ada", 20, "Ada Lovelace", "Birth Place", "London", "test"), doc_id="wiki-ada",
                 entity="Ada Lovelace", relation="Birth Place", value="London", call_offset=20,
                 source_url="https://en.wikipedia.org/wiki/Ada_Lovelace", annotator="test", annotator_version="1",
                 run_id="run-1")]
    pq.write_table(rows_to_table(rows, TRIPLET_SCHEMA), tmp_path / "triplets.parquet")
    con = connect(tmp_path / "w.duckdb")
    load_triplets(con, [str(tmp_path / "triplets.parquet")], "run-1")
    lookup_path = str(tmp_path / "lookup.parquet")
    export_lookup_db(con, parquet_path=lookup_path)
    db = LookupDatabase.load(lookup_path)
    index = ExactIndex(db)

    def value_written():
        [r] = generate(model, tok, ["Ada Lovelace was"], index, max_new_tokens=25)
        return r.lookups[0].value, r.lookups[0].sources

    assert value_written() == ("London", ["https://en.wikipedia.org/wiki/Ada_Lovelace"])
    edit_fact(con, "Ada Lovelace", "Birth Place", "Marylebone, London", reason="more precise")
    export_lookup_db(con, parquet_path=lookup_path)
    assert db.refresh()
    assert value_written() == ("Marylebone, London", ["warehouse edit"])  # no document states it
    edit_fact(con, "Ada Lovelace", "Birth Place", None, reason="unlearn")
    export_lookup_db(con, parquet_path=lookup_path)
    assert db.refresh()
    assert value_written() == (UNKNOWN, [])
