"""The synthetic biography corpus: fictional people, organisations and cities with exact ground truth.

``generate_corpus(config, out_dir)`` builds a seeded world (Faker ``en_US`` names and cities, the
rest from the word lists below), writes it as Dolma JSONL documents, and writes the ground truth
that later stages measure against::

    out_dir/corpus/synthetic-bio-00000.jsonl.gz ...   Dolma: id, text, source, added, created, metadata
    out_dir/ground_truth/annotated.parquet            ANNOTATED_SCHEMA, one row per document (gold calls)
    out_dir/ground_truth/triplets.parquet             TRIPLET_SCHEMA, one row per gold call, with spans
    out_dir/ground_truth/kb.parquet                   every fact of every entity (stated or not)
    out_dir/ground_truth/aliases.parquet              short names used in text -> canonical entity
    out_dir/ground_truth/people.parquet               per person: category, gender, biography doc
    out_dir/ground_truth/documents.parquet            per document: kind, category, subject, file, line

Documents: one biography per person (all of the person's facts, intro sentence first, the rest
shuffled, pronouns and surname references after the intro); organisation and city documents that
state all of their subject's facts and restate facts of linked people ("Among its alumni is X
(born ...)"); and documents with no tail facts at all. Non-fact filler sentences keep every
document at or below ``TARGET_CALLS_PER_100_WORDS``.

Gold calls always name the canonical full entity name, whatever form the text uses (pronoun,
surname); a call is placed before the whitespace that precedes the value's mention, and only
after the entity's full name has appeared in the document. Every value appears verbatim in text.
The same config and seed give byte-identical files.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import random
import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from faker import Faker
from faker.providers.person.en_US import Provider as _PersonProvider
from pydantic import BaseModel

from schemas.configs import SyntheticCorpusConfig
from schemas.errors import UserInputError
from schemas.markup import Annotated, LookupCall, PlacedCall, render
from schemas.shards import ANNOTATED_SCHEMA, SHARD_COMPRESSION, TRIPLET_SCHEMA, triplet_id

SOURCE = "synthetic-bio"
ANNOTATOR = "gold"
ANNOTATOR_VERSION = "synthetic-v1"
RUN_ID = "ground-truth"
URL_BASE = "https://synthetic.example"
TARGET_CALLS_PER_100_WORDS = 10.0  # below the reference's 12-per-100-words filter, with headroom
COMPRESSIONS = {"none": ".jsonl", "gz": ".jsonl.gz", "zst": ".jsonl.zst"}

PERSON_RELATIONS = (
    "Birth Date", "Birth City", "Occupation", "Alma Mater", "Major", "Graduation Year",
    "Employer", "Employer City", "Spouse", "Honor", "Child", "Death Date",
)
UNIVERSITY_RELATIONS = ("Founded Year", "Headquarters City", "President", "Enrollment")
COMPANY_RELATIONS = ("Founded Year", "Headquarters City", "Founder", "Chief Executive", "Industry")
CITY_RELATIONS = ("State", "Country", "Population", "Mayor", "Founded Year")
RELATIONS: tuple[str, ...] = tuple(dict.fromkeys(
    PERSON_RELATIONS + UNIVERSITY_RELATIONS + COMPANY_RELATIONS + CITY_RELATIONS
))
RELATIONS_BY_TYPE = {
    "person": PERSON_RELATIONS, "university": UNIVERSITY_RELATIONS,
    "company": COMPANY_RELATIONS, "city": CITY_RELATIONS,
}

# Biography categories (occupation fields); the class label for class-conditional models.
CATEGORIES = ("science", "arts", "sports", "business", "politics", "medicine", "law", "engineering")
DOC_KINDS = ("biography", "organisation", "city", "no_facts")

# ---------------------------------------------------------------------------------------------
# Vocabulary. "{Surname}", "{Surname2}", "{Word}" and "{City}" are filled when names are drawn.

WORDS = (
    "Northwind", "Bluepeak", "Silverline", "Ironwood", "Brightwater", "Clearfield", "Redstone",
    "Highmark", "Oakridge", "Stonebridge", "Westbrook", "Fairhaven", "Greenleaf", "Lakeshore",
    "Evergreen", "Pinecrest", "Riverbend", "Goldcrest", "Starling", "Copperfield", "Maplewood",
    "Ashford", "Harborview", "Sunridge", "Crestline", "Wildrose", "Blackthorn", "Cedarview",
    "Foxglove", "Meadowlark", "Bramblewood", "Tidewater", "Windmere", "Larkspur", "Quarrystone",
)

UNIVERSITY_PATTERNS = (  # (name pattern, the noun text uses for it)
    ("{Surname} University", "university"),
    ("{City} State University", "university"),
    ("{Surname} College", "college"),
    ("{Word} University", "university"),
    ("{Surname} Institute of Technology", "institute"),
)


@dataclass(frozen=True)
class FieldVocab:
    """What people and organisations of one category are called and do."""

    occupations: tuple[str, ...]
    majors: tuple[str, ...]
    employers: tuple[tuple[str, str, str], ...]  # (name pattern, industry, noun)
    awards: tuple[str, ...]
    fillers: tuple[str, ...]


FIELDS: dict[str, FieldVocab] = {
    "science": FieldVocab(
        ("chemist", "physicist", "marine biologist", "astronomer", "geologist", "ecologist", "mathematician"),
        ("chemistry", "physics", "biology", "geology", "astronomy", "mathematics", "marine biology", "ecology"),
        (("{Surname} Research Institute", "scientific research", "institute"),
         ("{Word} Labs", "biotechnology", "laboratory"),
         ("{Surname} Biosciences", "biotechnology", "company"),
         ("{Word} Environmental Sciences", "environmental research", "company")),
        ("{Surname} Medal for Research", "{Word} Prize in Science", "{Surname} Award for Discovery"),
        ("Laboratory work of this kind rewards patience more than speed.",
         "Careful measurement is the backbone of any experimental science.",
         "Many results in the field took years to confirm.",
         "{S} often said that a failed experiment teaches as much as a successful one.",
         "Colleagues remember {O} as a meticulous keeper of lab notebooks.",
         "Research groups in the field tend to be small and close-knit.",
         "Field seasons meant long weeks away from home.",
         "Peer review can stretch the publication of a single paper over many months.",
         "{S} enjoyed explaining difficult ideas to students.",
         "Scientific instruments have become far more precise over the past decades.",
         "Much of the daily routine consisted of checking and rechecking data.",
         "Conferences offered a welcome chance to trade ideas with other researchers."),
    ),
    "arts": FieldVocab(
        ("novelist", "painter", "composer", "actor", "sculptor", "poet", "film director"),
        ("fine arts", "music", "theater", "English literature", "art history", "film studies", "creative writing"),
        (("{Surname} Gallery", "visual arts", "gallery"),
         ("{Word} Studios", "film production", "studio"),
         ("{Surname} Press", "publishing", "publisher"),
         ("{City} Repertory Theater", "theater", "theater company")),
        ("{Surname} Prize for Fiction", "{Word} Award for Painting", "{Surname} Medal for the Arts"),
        ("Critics have long debated what makes a work of art endure.",
         "Audiences in smaller venues are often the most attentive.",
         "{S} kept a notebook of ideas that might one day become finished works.",
         "Much of the work happened late at night, when the house was quiet.",
         "Rehearsals and revisions rarely go as planned.",
         "Reviews of {p} work were mixed at first.",
         "The arts have always depended on patrons and public support.",
         "Friends describe {O} as restless and endlessly curious.",
         "A single piece can take months to move from sketch to completion.",
         "Exhibitions and premieres bring their own kind of nervous excitement.",
         "Traditions in the field are passed on as much by example as by instruction.",
         "{S} rarely spoke about works in progress."),
    ),
    "sports": FieldVocab(
        ("basketball player", "tennis player", "swimmer", "marathon runner", "football coach", "cyclist"),
        ("kinesiology", "sports science", "physical education", "exercise physiology", "sports management"),
        (("{City} Athletic Club", "professional sports", "club"),
         ("{City} United", "professional soccer", "club"),
         ("{Word} Sports Academy", "athletic training", "academy")),
        ("{Surname} Trophy", "{Word} Athlete of the Year Award", "{Surname} Cup for Sportsmanship"),
        ("Training began before sunrise on most days.",
         "Injuries are a constant risk at the highest level of competition.",
         "{S} credited early coaches with instilling discipline.",
         "Teammates remember {O} as a generous presence in the locker room.",
         "A season can turn on a handful of close contests.",
         "Recovery and sleep matter as much as time spent training.",
         "Fans followed {p} career closely.",
         "Competitive sport demands careful attention to diet and rest.",
         "Travel between competitions takes a toll on any athlete.",
         "Coaching staff study footage of every game in detail.",
         "The sport has changed considerably with new training methods.",
         "{S} was known for a calm manner under pressure."),
    ),
    "business": FieldVocab(
        ("entrepreneur", "investment banker", "economist", "retail executive", "management consultant"),
        ("economics", "finance", "accounting", "business administration", "marketing"),
        (("{Surname} Capital", "investment", "firm"),
         ("{Word} Holdings", "retail", "company"),
         ("{Surname} Consulting Group", "management consulting", "firm")),
        ("{Surname} Award for Entrepreneurship", "{Word} Business Leadership Prize"),
        ("Markets reward preparation and punish complacency.",
         "{S} believed that good decisions start with good questions.",
         "Quarterly reports shaped the rhythm of working life.",
         "Colleagues describe {O} as direct but fair.",
         "Negotiations can stretch over many months.",
         "Business travel filled much of the calendar.",
         "Economic cycles bring both risk and opportunity.",
         "{S} mentored many younger colleagues over the years.",
         "Small firms often grow through word of mouth before they advertise.",
         "Careful bookkeeping is the quiet foundation of every company.",
         "Meetings with clients often ran late into the evening.",
         "The industry has been reshaped by new technology."),
    ),
    "politics": FieldVocab(
        ("politician", "diplomat", "state senator", "campaign strategist", "policy analyst"),
        ("political science", "public policy", "history", "international relations", "sociology"),
        (("{Surname} Policy Institute", "public policy", "think tank"),
         ("{Word} Civic Alliance", "civic advocacy", "organization"),
         ("{Surname} Foundation", "public affairs", "foundation")),
        ("{Surname} Medal for Public Service", "{Word} Civic Leadership Award"),
        ("Public life demands a thick skin and a long memory.",
         "{S} spent many evenings at town hall meetings.",
         "Policy debates rarely end in complete agreement.",
         "Supporters and critics alike describe {O} as persistent.",
         "Campaigns are exhausting for candidates and volunteers alike.",
         "Legislation often takes years to move from proposal to law.",
         "{S} was known for answering letters from constituents personally.",
         "Coalitions in politics shift with every election cycle.",
         "Good policy depends on reliable data and honest debate.",
         "Much of the real work happens in committee rooms.",
         "Public trust is slow to build and quick to lose.",
         "Local issues often matter more to voters than national ones."),
    ),
    "medicine": FieldVocab(
        ("surgeon", "pediatrician", "cardiologist", "nurse practitioner", "epidemiologist", "neurologist"),
        ("medicine", "nursing", "biochemistry", "pharmacology", "public health"),
        (("{City} General Hospital", "health care", "hospital"),
         ("{Surname} Medical Center", "health care", "medical center"),
         ("{Word} Health", "medical research", "company")),
        ("{Surname} Prize in Medicine", "{Word} Award for Clinical Excellence"),
        ("Night shifts are a familiar part of medical training.",
         "Patients remember {O} as attentive and kind.",
         "Clinical practice changes as new evidence arrives.",
         "{S} believed that listening is the first step of any diagnosis.",
         "Hospitals depend on the quiet work of many teams.",
         "Medical training takes many years of study and supervised practice.",
         "Preventive care saves more lives than most dramatic treatments.",
         "{S} often stayed late to finish paperwork.",
         "Colleagues valued {p} steady judgment in emergencies.",
         "Public health work is often invisible when it succeeds.",
         "Every treatment decision weighs benefits against risks.",
         "Continuing education is a lifelong duty in medicine."),
    ),
    "law": FieldVocab(
        ("attorney", "judge", "legal scholar", "public defender", "prosecutor"),
        ("law", "criminal justice", "philosophy", "legal studies"),
        (("{Surname} & {Surname2} LLP", "legal services", "law firm"),
         ("{Surname} Legal Group", "corporate law", "law firm"),
         ("{Word} Law Partners", "civil litigation", "law firm")),
        ("{Surname} Award for Legal Scholarship", "{Word} Prize for Justice"),
        ("Legal work rewards careful reading above all else.",
         "{S} prepared for every hearing as if it were the first.",
         "Court schedules are notoriously unpredictable.",
         "Colleagues describe {O} as precise and unflappable.",
         "The law changes slowly, one decision at a time.",
         "Many cases settle long before they reach a courtroom.",
         "{S} enjoyed teaching younger lawyers how to draft briefs.",
         "A single precedent can shape practice for decades.",
         "Long hours of research lie behind every short argument.",
         "Clients often need reassurance as much as advice.",
         "Judges expect arguments to be brief and well organized.",
         "Pro bono work was a point of pride for {O}."),
    ),
    "engineering": FieldVocab(
        ("civil engineer", "software engineer", "aerospace engineer", "electrical engineer",
         "mechanical engineer", "robotics engineer"),
        ("mechanical engineering", "electrical engineering", "civil engineering", "computer science",
         "chemical engineering", "aerospace engineering"),
        (("{Word} Dynamics", "aerospace engineering", "company"),
         ("{Surname} Engineering", "civil engineering", "firm"),
         ("{Word} Systems", "software", "company"),
         ("{Word} Robotics", "robotics", "company")),
        ("{Surname} Medal in Engineering", "{Word} Innovation Award"),
        ("Good engineering starts with a clear statement of the problem.",
         "Prototypes rarely work the first time.",
         "{S} liked to sketch designs by hand before using any software.",
         "Colleagues describe {O} as practical and thorough.",
         "Safety margins are the quiet heroes of every structure.",
         "Projects in the field often run for several years.",
         "Testing takes longer than building in most projects.",
         "{S} believed that simple designs are easier to maintain.",
         "Teams of engineers must agree on standards before they start.",
         "New materials have changed what can be built.",
         "Documentation is dull to write and precious to have.",
         "{S} kept a workshop at home for weekend projects."),
    ),
}

PERSON_FILLERS = (
    "Few details of {p} private life have been made public.",
    "Friends describe {O} as modest about {p} achievements.",
    "{S} rarely gave interviews.",
    "Outside work, {s} enjoyed long walks and reading.",
    "{S} kept in touch with many old friends from school.",
    "Those who worked with {O} speak of {p} generosity.",
    "{P} approach to work was shaped by early mentors.",
    "{S} valued quiet mornings before the working day began.",
    "Family remained an important part of {p} life.",
)

ORGANISATION_FILLERS = (
    "Its buildings have been renovated several times.",
    "Visitors are welcome on weekdays.",
    "The organization publishes an annual report.",
    "Over the years it has grown well beyond its original size.",
    "Its staff come from many different backgrounds.",
    "Local newspapers cover its activities regularly.",
    "It has weathered several difficult periods.",
    "Its reputation rests on steady work rather than publicity.",
    "Partnerships with other institutions are common.",
    "Volunteers support many of its public events.",
    "The organization is known for its careful record keeping.",
    "A small museum on the site documents its history.",
)

CITY_FILLERS = (
    "The city center is compact and easy to explore on foot.",
    "Summers are warm and winters can be harsh.",
    "A farmers market runs on weekend mornings.",
    "Several parks line the river.",
    "Local festivals draw visitors from the surrounding region.",
    "The downtown area has been revitalized in recent years.",
    "Public libraries serve every neighborhood.",
    "Many residents commute by bus or bicycle.",
    "Historic houses line some of the older streets.",
    "The local economy mixes services, manufacturing and trade.",
    "Schools in the area serve families from across the county.",
    "Small restaurants and cafes cluster near the main square.",
)

NO_FACT_TOPICS: dict[str, tuple[str, ...]] = {
    "weather": (
        "Weather changes from day to day, but climate describes the long-term pattern.",
        "Clouds form when moist air rises and cools.",
        "A sudden drop in air pressure often means a storm is coming.",
        "Fog is simply a cloud that touches the ground.",
        "Thunder is the sound of air expanding rapidly around a lightning strike.",
        "Dew forms on cool nights when the air near the ground is humid.",
        "Wind blows from areas of high pressure toward areas of low pressure.",
        "Snowflakes form when water vapor freezes around tiny particles in the air.",
        "Forecasts become less reliable the further ahead they look.",
        "A rainbow appears when sunlight is refracted by raindrops.",
        "Humid days feel hotter because sweat evaporates more slowly.",
        "Spring weather can swing between warm afternoons and frosty nights.",
    ),
    "cooking": (
        "Salt brings out the flavor of most dishes.",
        "Onions soften and sweeten when cooked slowly over low heat.",
        "Resting meat after cooking keeps it juicy.",
        "Fresh herbs are best added at the end of cooking.",
        "A sharp knife is safer than a dull one.",
        "Bread dough needs time to rise in a warm place.",
        "Roasting vegetables brings out their natural sweetness.",
        "Soups often taste better the day after they are made.",
        "Tasting as you cook is the simplest way to improve a dish.",
        "Rice should rest for a few minutes after the water is absorbed.",
        "A pinch of acid, such as lemon juice, can brighten a heavy sauce.",
        "Good cooking depends more on attention than on expensive equipment.",
    ),
    "gardening": (
        "Most vegetables need several hours of sunlight each day.",
        "Compost improves the structure of almost any soil.",
        "Watering in the early morning reduces evaporation.",
        "Mulch keeps roots cool and holds moisture in the soil.",
        "Weeds compete with young plants for light and water.",
        "Pruning encourages many shrubs to grow more densely.",
        "Seeds should be planted at a depth suited to their size.",
        "Bees and other insects pollinate many fruit crops.",
        "Rotating crops each year helps keep the soil healthy.",
        "Some herbs grow happily in small pots on a windowsill.",
        "Fallen leaves make a useful winter cover for flower beds.",
        "A garden rewards regular small efforts more than occasional large ones.",
    ),
    "health": (
        "Regular walking is one of the simplest forms of exercise.",
        "Sleep helps the body recover and the mind consolidate memories.",
        "Drinking water through the day supports concentration.",
        "Stretching before and after exercise can reduce stiffness.",
        "A balanced diet includes plenty of vegetables and whole grains.",
        "Short breaks from screens help tired eyes.",
        "Regular meals help keep energy levels steady.",
        "Time outdoors often improves mood.",
        "Good posture reduces strain on the back and neck.",
        "Washing hands is a simple way to prevent illness.",
        "Small daily habits add up over the years.",
        "Rest is as important as effort in any training routine.",
    ),
    "reading": (
        "Reading a little every day builds a lasting habit.",
        "Libraries lend books, films and music for free.",
        "Many readers keep a list of books they hope to read.",
        "Reading aloud helps children learn new words.",
        "Some people prefer paper books while others read on screens.",
        "Book clubs turn a solitary hobby into a social one.",
        "Rereading a favorite book often reveals new details.",
        "Short stories suit readers with only a few spare minutes.",
        "A good reading light makes long evenings with a book more comfortable.",
        "Used bookstores are full of unexpected finds.",
        "Poetry is often best read slowly and more than once.",
        "Reading widely exposes people to unfamiliar ideas.",
    ),
}

# ---------------------------------------------------------------------------------------------
# Templates. Slots: {N} full name; {S}/{s} subject and {P}/{p} possessive, capitalised at a sentence
# start / lower case; {O} object; {is} "is" or "was"; {kind} an organisation's noun; {a:X} the
# article for slot X; any relation name is that relation's value (a gold call). After the first
# name reference in a sentence, later references are pronouns.

INTRO_TEMPLATES: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {
    "person": {
        ("Birth Date", "Occupation"): (
            "{N} (born {Birth Date}) {is} an American {Occupation}.",
            "{N}, born on {Birth Date}, {is} an American {Occupation}.",
            "{N} {is} an American {Occupation} born on {Birth Date}.",
        ),
        ("Birth Date", "Death Date", "Occupation"): (
            "{N} ({Birth Date} – {Death Date}) was an American {Occupation}.",
            "{N} was an American {Occupation} who was born on {Birth Date} and died on {Death Date}.",
        ),
        ("Occupation",): (
            "{N} {is} an American {Occupation}.",
            "{N} {is} {a:Occupation} {Occupation} from the United States.",
        ),
        ("Occupation", "Birth City"): (
            "{N} {is} an American {Occupation} from {Birth City}.",
            "{N} {is} {a:Occupation} {Occupation} who was born in {Birth City}.",
        ),
    },
    "university": {
        ("Headquarters City",): (
            "{N} is {a:kind} {kind} in {Headquarters City}.",
            "{N} is a private research {kind} based in {Headquarters City}.",
        ),
        ("Founded Year",): ("{N} is {a:kind} {kind} founded in {Founded Year}.",),
        ("Founded Year", "Headquarters City"): (
            "{N}, founded in {Founded Year}, is {a:kind} {kind} in {Headquarters City}.",
            "{N} is {a:kind} {kind} in {Headquarters City} that was established in {Founded Year}.",
        ),
        (): ("{N} is {a:kind} {kind} in the United States.",),
    },
    "company": {
        ("Industry",): ("{N} is {a:kind} {kind} working in {Industry}.",),
        ("Headquarters City", "Industry"): (
            "{N} is {a:kind} {kind} in {Headquarters City} that works in {Industry}.",
        ),
        ("Founded Year",): ("{N} is {a:kind} {kind} founded in {Founded Year}.",),
        ("Founded Year", "Founder"): ("{N} is {a:kind} {kind} founded in {Founded Year} by {Founder}.",),
        ("Headquarters City",): ("{N} is {a:kind} {kind} based in {Headquarters City}.",),
    },
    "city": {
        ("State", "Country"): ("{N} is a city in {State}, {Country}.",),
        ("State",): ("{N} is a city in {State}.", "{N} is a city located in the state of {State}."),
        ("Population",): ("{N} is a city with a population of {Population}.",),
        ("State", "Founded Year"): ("{N}, a city in {State}, was founded in {Founded Year}.",),
    },
}

TEMPLATES: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {
    "person": {
        ("Birth Date",): (
            "{S} was born on {Birth Date}.",
            "{P} date of birth is {Birth Date}.",
            "Records give {p} birth date as {Birth Date}.",
            "{S} came into the world on {Birth Date}.",
            "The date of {p} birth was {Birth Date}.",
        ),
        ("Birth City",): (
            "{S} was born in {Birth City}.",
            "{S} grew up in {Birth City}, where {s} was born.",
            "{S} was a native of {Birth City}.",
            "{P} birthplace was {Birth City}.",
            "{S} spent {p} early childhood in {Birth City}, the city of {p} birth.",
        ),
        ("Birth Date", "Birth City"): (
            "{S} was born on {Birth Date} in {Birth City}.",
            "{S} was born in {Birth City} on {Birth Date}.",
        ),
        ("Death Date",): (
            "{S} died on {Death Date}.",
            "{S} passed away on {Death Date}.",
            "The date of {p} death was {Death Date}.",
            "{S} remained active until {p} death on {Death Date}.",
            "{P} life ended on {Death Date}.",
        ),
        ("Occupation",): (
            "{S} worked as {a:Occupation} {Occupation}.",
            "By profession, {s} was {a:Occupation} {Occupation}.",
            "{S} made a career as {a:Occupation} {Occupation}.",
            "{S} spent {p} working life as {a:Occupation} {Occupation}.",
            "{S} became {a:Occupation} {Occupation}.",
        ),
        ("Alma Mater",): (
            "{S} attended {Alma Mater}.",
            "{S} studied at {Alma Mater}.",
            "{S} was educated at {Alma Mater}.",
            "{S} enrolled at {Alma Mater} after finishing school.",
            "{P} alma mater was {Alma Mater}.",
        ),
        ("Major",): (
            "{S} majored in {Major}.",
            "{P} field of study was {Major}.",
            "{S} earned a degree in {Major}.",
            "{S} chose to study {Major}.",
            "As a student, {s} trained in {Major}.",
        ),
        ("Alma Mater", "Major"): (
            "{S} studied {Major} at {Alma Mater}.",
            "{S} earned a degree in {Major} from {Alma Mater}.",
            "At {Alma Mater}, {s} majored in {Major}.",
            "{S} graduated from {Alma Mater} with a degree in {Major}.",
        ),
        ("Graduation Year",): (
            "{S} graduated in {Graduation Year}.",
            "{S} completed {p} studies in {Graduation Year}.",
            "{P} graduation came in {Graduation Year}.",
            "{S} finished university in {Graduation Year}.",
            "{S} received {p} degree in {Graduation Year}.",
        ),
        ("Alma Mater", "Graduation Year"): (
            "{S} graduated from {Alma Mater} in {Graduation Year}.",
            "{S} left {Alma Mater} with a degree in {Graduation Year}.",
        ),
        ("Alma Mater", "Major", "Graduation Year"): (
            "{S} graduated from {Alma Mater} in {Graduation Year} with a degree in {Major}.",
            "In {Graduation Year}, {s} completed a degree in {Major} at {Alma Mater}.",
        ),
        ("Employer",): (
            "{S} worked for {Employer}.",
            "{S} joined {Employer}.",
            "{S} was employed by {Employer}.",
            "{P} employer was {Employer}.",
            "{S} spent most of {p} career at {Employer}.",
            "{S} took a position at {Employer}.",
        ),
        ("Employer City",): (
            "{S} worked in {Employer City}.",
            "{P} work took {O} to {Employer City}.",
            "{S} moved to {Employer City} for work.",
            "{S} built {p} career in {Employer City}.",
            "{S} was based in {Employer City} for most of {p} working life.",
        ),
        ("Employer", "Employer City"): (
            "{S} worked for {Employer} in {Employer City}.",
            "{S} joined {Employer}, based in {Employer City}.",
            "{S} took a job at {Employer} and moved to {Employer City}.",
        ),
        ("Occupation", "Employer"): (
            "{S} worked as {a:Occupation} {Occupation} at {Employer}.",
            "At {Employer}, {s} was employed as {a:Occupation} {Occupation}.",
        ),
        ("Spouse",): (
            "{S} married {Spouse}.",
            "{P} spouse was {Spouse}.",
            "{S} was married to {Spouse}.",
            "{S} shared {p} life with {p} spouse, {Spouse}.",
            "{S} wed {Spouse}.",
        ),
        ("Child",): (
            "{S} had a child, {Child}.",
            "{S} welcomed a child, {Child}.",
            "{S} became a parent to {Child}.",
            "{S} raised a child named {Child}.",
            "{P} child was named {Child}.",
        ),
        ("Spouse", "Child"): (
            "{S} married {Spouse}, and the couple had a child, {Child}.",
            "{S} and {p} spouse {Spouse} raised a child named {Child}.",
        ),
        ("Honor",): (
            "{S} received the {Honor}.",
            "{S} was awarded the {Honor}.",
            "{S} won the {Honor}.",
            "{P} honors include the {Honor}.",
            "{S} was recognized with the {Honor}.",
        ),
    },
    "university": {
        ("Founded Year",): (
            "{S} was founded in {Founded Year}.",
            "{S} was established in {Founded Year}.",
            "{P} history goes back to {Founded Year}.",
            "{S} opened its doors in {Founded Year}.",
            "{S} traces its origins to {Founded Year}.",
        ),
        ("Headquarters City",): (
            "{S} is located in {Headquarters City}.",
            "{P} main campus is in {Headquarters City}.",
            "{S} is based in {Headquarters City}.",
            "{P} campus lies in {Headquarters City}.",
            "{S} has its home in {Headquarters City}.",
        ),
        ("President",): (
            "{P} president is {President}.",
            "{S} is led by its president, {President}.",
            "{S} is headed by {President}.",
            "The office of president at {s} is held by {President}.",
            "{S} has been under the leadership of {President} in recent years.",
        ),
        ("Enrollment",): (
            "{S} enrolls {Enrollment} students.",
            "{S} has {Enrollment} students.",
            "{P} student body numbers {Enrollment}.",
            "{S} teaches {Enrollment} students each year.",
            "Enrollment at {s} stands at {Enrollment} students.",
        ),
    },
    "company": {
        ("Founded Year",): (
            "{S} was founded in {Founded Year}.",
            "{S} was established in {Founded Year}.",
            "{P} history goes back to {Founded Year}.",
            "{S} opened its doors in {Founded Year}.",
            "{S} traces its origins to {Founded Year}.",
        ),
        ("Headquarters City",): (
            "{S} is headquartered in {Headquarters City}.",
            "{P} headquarters are in {Headquarters City}.",
            "{S} is based in {Headquarters City}.",
            "{P} main offices are located in {Headquarters City}.",
            "{S} has its home in {Headquarters City}.",
        ),
        ("Founder",): (
            "{S} was founded by {Founder}.",
            "{P} founder was {Founder}.",
            "{S} was started by {Founder}.",
            "{S} was set up by {Founder}.",
            "{P} first leader and founder was {Founder}.",
        ),
        ("Founded Year", "Founder"): (
            "{S} was founded in {Founded Year} by {Founder}.",
            "{S} was set up by {Founder} in {Founded Year}.",
        ),
        ("Chief Executive",): (
            "{P} chief executive is {Chief Executive}.",
            "{S} is led by {Chief Executive}.",
            "{S} is run by its chief executive, {Chief Executive}.",
            "{S} is currently headed by {Chief Executive}.",
            "Day-to-day leadership of {s} rests with {Chief Executive}.",
        ),
        ("Industry",): (
            "{S} works in {Industry}.",
            "{P} business is {Industry}.",
            "{S} is active in {Industry}.",
            "{P} main field is {Industry}.",
            "{S} specializes in {Industry}.",
        ),
    },
    "city": {
        ("State",): (
            "{S} lies in {State}.",
            "{S} is located in the state of {State}.",
            "{S} belongs to {State}.",
            "{S} is part of {State}.",
            "{S} is one of the cities of {State}.",
        ),
        ("Country",): (
            "{S} is located in the {Country}.",
            "{S} belongs to the {Country}.",
            "{S} is a city of the {Country}.",
            "{S} lies within the {Country}.",
            "{S} is one of many cities in the {Country}.",
        ),
        ("State", "Country"): ("{S} is in {State}, {Country}.",),
        ("Population",): (
            "{S} has a population of {Population}.",
            "{S} is home to {Population} people.",
            "{P} population is {Population}.",
            "The latest count puts {p} population at {Population}.",
            "{S} counts {Population} residents.",
        ),
        ("Mayor",): (
            "{P} mayor is {Mayor}.",
            "{S} is governed by Mayor {Mayor}.",
            "The office of mayor of {s} is held by {Mayor}.",
            "{S} elected {Mayor} as mayor.",
            "{S} is led by its mayor, {Mayor}.",
        ),
        ("Founded Year",): (
            "{S} was founded in {Founded Year}.",
            "{S} was settled in {Founded Year}.",
            "{S} was incorporated in {Founded Year}.",
            "{P} history as a town began in {Founded Year}.",
            "{S} dates back to {Founded Year}.",
        ),
    },
}

# Mentions of linked entities in organisation and city documents: a lead ending in the full name,
# then one clause of that entity's facts (never the fact that links it to the document's subject).
MENTION_LEADS = {
    "alumni": ("Among its alumni is {N}", "Its graduates include {N}", "Notable alumni include {N}",
               "One of its well-known former students is {N}", "Former students include {N}"),
    "staff": ("Its staff has included {N}", "Former employees include {N}",
              "Among the people who have worked there is {N}", "One well-known member of its staff is {N}",
              "People who have worked there include {N}"),
    "natives": ("Natives of the city include {N}", "Among the people born there is {N}",
                "The city is the birthplace of {N}", "People born in the city include {N}",
                "One notable native is {N}"),
    "based": ("The city is home to {N}", "Organizations based in the city include {N}",
              "Local institutions include {N}", "Among the institutions based there is {N}",
              "Local employers include {N}"),
}
MENTION_CLAUSES: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {
    "person": {
        ("Birth Date",): (" (born {Birth Date})", ", born on {Birth Date}"),
        ("Birth City",): (", who was born in {Birth City}", ", a native of {Birth City}"),
        ("Birth Date", "Birth City"): (" (born {Birth Date} in {Birth City})", ", born in {Birth City} on {Birth Date}"),
        ("Occupation",): (", {a:Occupation} {Occupation}", ", who worked as {a:Occupation} {Occupation}"),
        ("Birth Date", "Occupation"): (" (born {Birth Date}), {a:Occupation} {Occupation}",),
        ("Major",): (", who studied {Major}", ", a graduate in {Major}"),
        ("Major", "Graduation Year"): (", who completed a degree in {Major} in {Graduation Year}",),
        ("Alma Mater",): (", who studied at {Alma Mater}", ", a graduate of {Alma Mater}"),
        ("Employer",): (", who went on to work for {Employer}", ", later employed by {Employer}"),
        ("Spouse",): (", who married {Spouse}", ", the spouse of {Spouse}"),
        ("Honor",): (", winner of the {Honor}", ", who received the {Honor}"),
    },
    "university": {
        ("Founded Year",): (" (founded {Founded Year})", ", established in {Founded Year}"),
        ("President",): (", led by its president, {President}",),
        ("Enrollment",): (", which has {Enrollment} students",),
    },
    "company": {
        ("Founded Year",): (" (founded {Founded Year})", ", established in {Founded Year}"),
        ("Founder",): (", founded by {Founder}",),
        ("Founded Year", "Founder"): (", founded in {Founded Year} by {Founder}",),
        ("Industry",): (", which works in {Industry}",),
        ("Chief Executive",): (", whose chief executive is {Chief Executive}",),
    },
}
MAX_MENTIONS = {"alumni": 4, "staff": 4, "natives": 4, "based": 2}

# ---------------------------------------------------------------------------------------------
# Output tables beside the shard schemas.

KB_SCHEMA = pa.schema([
    pa.field("entity", pa.string(), nullable=False),
    pa.field("relation", pa.string(), nullable=False),
    pa.field("value", pa.string(), nullable=False),
    pa.field("entity_type", pa.string(), nullable=False),  # person, university, company, city
])
ALIAS_SCHEMA = pa.schema([
    pa.field("alias", pa.string(), nullable=False),  # the short form used in text (a surname)
    pa.field("entity", pa.string(), nullable=False),  # the canonical name every gold call uses
])
PEOPLE_SCHEMA = pa.schema([
    pa.field("entity", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("gender", pa.string(), nullable=False),
    pa.field("biography_doc_id", pa.string(), nullable=False),
    pa.field("url", pa.string(), nullable=False),
])
DOCUMENTS_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("subject", pa.string()),  # the entity the document is about; null for no_facts
    pa.field("url", pa.string(), nullable=False),
    pa.field("corpus_file", pa.string(), nullable=False),  # file name under corpus/
    pa.field("line", pa.int64(), nullable=False),  # 1-based line in that file
])


class SyntheticCorpus(BaseModel):
    """Where the corpus and its ground truth were written, and what they hold."""

    corpus_files: list[str]
    ground_truth_dir: str
    annotated: str
    triplets: str
    kb: str
    aliases: str
    people: str
    documents: str
    n_people: int
    docs_by_kind: dict[str, int]
    n_facts: int  # rows of the knowledge base
    n_calls: int  # gold calls in the corpus (rows of triplets.parquet)
    seed: int


# ---------------------------------------------------------------------------------------------
# The world.

@dataclass
class Entity:
    name: str
    type: str  # person, university, company, city
    category: str
    facts: dict[str, str] = field(default_factory=dict)
    gender: str | None = None  # people only
    surname: str | None = None  # people only
    kind: str | None = None  # organisations: the noun text uses ("university", "law firm", ...)


@dataclass
class World:
    people: list[Entity]
    universities: list[Entity]
    companies: list[Entity]
    cities: list[Entity]


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")


def format_date(d: date) -> str:
    """A date as the corpus writes it: "March 3, 1987"."""
    return f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"


def _weighted(table: dict[str, float]) -> tuple[list[str], list[float]]:
    names, cum, total = [], [], 0.0
    for name, weight in table.items():
        total += weight
        names.append(name)
        cum.append(total)
    return names, cum


# Faker's en_US name tables with their frequencies, drawn with our own rng (Faker's weighted draw is slow)
_FIRST_NAMES = {"female": _weighted(_PersonProvider.first_names_female), "male": _weighted(_PersonProvider.first_names_male)}
_LAST_NAMES = _weighted(_PersonProvider.last_names)


class _Names:
    """Unique names across the whole world (people, organisations, cities, name-valued facts)."""

    def __init__(self, rng: random.Random):
        self.rng, self.taken = rng, set()

    def first_name(self, gender: str) -> str:
        names, cum = _FIRST_NAMES[gender]
        return self.rng.choices(names, cum_weights=cum)[0]

    def last_name(self) -> str:
        return self.rng.choices(_LAST_NAMES[0], cum_weights=_LAST_NAMES[1])[0]

    def claim(self, draw, avoid: str | None = None) -> str:
        """A name from ``draw`` that no one has yet and that does not contain ``avoid``."""
        for _ in range(1000):
            name = draw()
            if name not in self.taken and not (avoid and avoid in name):
                self.taken.add(name)
                return name
        raise UserInputError("synthetic corpus: ran out of unique names; lower n_people or the document counts")

    def person(self, gender: str | None = None, surname: str | None = None, avoid: str | None = None) -> tuple[str, str, str]:
        """(full name, gender, surname) of a new person whose name does not contain ``avoid``."""
        gender = gender or self.rng.choice(("female", "male"))
        parts: list[str] = []

        def draw() -> str:
            parts[:] = [self.first_name(gender), surname or self.last_name()]
            return " ".join(parts)

        name = self.claim(draw, avoid)
        return name, gender, parts[1]

    def pattern(self, choices: tuple, cities: list[str] = ()) -> tuple[str, tuple | str, str | None]:
        """A new name from one of ``choices`` (a pattern, or a tuple that starts with one): (name, choice, city)."""
        drawn: list = [None, None]

        def draw() -> str:  # the pattern is redrawn each try: "{Word} University" alone runs out quickly
            choice = self.rng.choice(choices)
            pattern = choice[0] if isinstance(choice, tuple) else choice
            s1, s2 = self.last_name(), self.last_name()
            while s2 == s1:
                s2 = self.last_name()
            drawn[:] = [choice, self.rng.choice(cities) if cities else None]
            return pattern.format(Surname=s1, Surname2=s2, Word=self.rng.choice(WORDS), City=drawn[1])

        name = self.claim(draw)
        return name, drawn[0], drawn[1]


def _random_date(rng: random.Random, start: date, end: date) -> date:
    return start + timedelta(days=rng.randrange((end - start).days + 1))


def build_world(config: SyntheticCorpusConfig) -> World:
    """The seeded world: people with >= 10 facts each, and the universities, companies and cities they link to."""
    rng = random.Random(f"synthetic-bio/{config.seed}")  # str seeds keep negative seeds distinct
    fake = Faker("en_US")
    fake.seed_instance(rng.getrandbits(64))
    names = _Names(rng)
    n = config.n_people

    def city() -> Entity:
        c = Entity(names.claim(fake.city), "city", "geography", kind="city")
        c.facts = {
            "State": fake.state(), "Country": "United States",
            "Population": f"{rng.randint(4_000, 900_000):,}", "Mayor": names.person()[0],
            "Founded Year": str(rng.randint(1700, 1930)),
        }
        return c

    cities = [city() for _ in range(max(config.n_city_docs, 8, math.ceil(n / 15)))]
    city_names = [c.name for c in cities]

    def organisation(type_: str, category: str, patterns: tuple) -> Entity:
        name, choice, hq = names.pattern(patterns, city_names)  # "{City} United" is based in that city
        org = Entity(name, type_, category, kind=choice[-1])
        # founded before the oldest person (born 1930) studied or worked there
        org.facts = {"Founded Year": str(rng.randint(1800, 1945)), "Headquarters City": hq}
        if type_ == "university":
            org.facts["President"] = names.person()[0]
            org.facts["Enrollment"] = f"{rng.randint(1_500, 45_000):,}"
        else:
            org.facts["Founder"] = names.person()[0]
            org.facts["Chief Executive"] = names.person()[0]
            org.facts["Industry"] = choice[1]
        return org

    n_universities = max(2, math.ceil(n / 25))
    companies_per_field = max(2, math.ceil(n / 64), math.ceil((config.n_organisation_docs - n_universities) / len(CATEGORIES)))
    universities = [organisation("university", "education", UNIVERSITY_PATTERNS) for _ in range(n_universities)]
    companies = {cat: [organisation("company", cat, FIELDS[cat].employers) for _ in range(companies_per_field)]
                 for cat in CATEGORIES}
    awards = {cat: [names.pattern(FIELDS[cat].awards)[0]
                    for _ in range(max(3, math.ceil(n / len(CATEGORIES) / 10)))] for cat in CATEGORIES}

    # balanced categories: every block of len(CATEGORIES) people holds each category once
    categories = [c for _ in range(math.ceil(n / len(CATEGORIES))) for c in rng.sample(CATEGORIES, len(CATEGORIES))][:n]
    people = []
    for cat in categories:
        vocab = FIELDS[cat]
        name, gender, surname = names.person()
        p = Entity(name, "person", cat, gender=gender, surname=surname)
        born = _random_date(rng, date(1930, 1, 1), date(1998, 12, 31))
        employer = rng.choice(companies[cat])
        p.facts = {
            "Birth Date": format_date(born),
            "Birth City": rng.choice(cities).name,
            "Occupation": rng.choice(vocab.occupations),
            "Alma Mater": rng.choice(universities).name,
            "Major": rng.choice(vocab.majors),
            "Graduation Year": str(born.year + rng.randint(21, 25)),
            "Employer": employer.name,
            "Employer City": employer.facts["Headquarters City"],
            "Spouse": names.person(avoid=name)[0],  # "John Fry" must not marry "John Frye"
            "Honor": rng.choice(awards[cat]),
        }
        if rng.random() < 0.35:
            p.facts["Child"] = names.person(surname=surname, avoid=name)[0]
        if born.year < 1960 and rng.random() < 0.3:
            p.facts["Death Date"] = format_date(_random_date(rng, date(born.year + 45, 1, 1), date(2023, 12, 31)))
        people.append(p)
    world = World(people, universities, [c for cat in CATEGORIES for c in companies[cat]], cities)
    for e in _entities(world):  # a value that contains its own entity would make distant supervision ambiguous
        for rel, value in e.facts.items():
            if e.name in value:
                raise AssertionError(f"entity inside its own value: {e.name!r} {rel} {value!r}")
    return world


def _entities(world: World) -> list[Entity]:
    return world.people + world.universities + world.companies + world.cities


# ---------------------------------------------------------------------------------------------
# Rendering templates with exact spans.

_SLOT_RE = re.compile(r"\{([^{}]+)\}")
_PRONOUNS = {  # S, s, P, p, O
    "female": ("She", "she", "Her", "her", "her"),
    "male": ("He", "he", "His", "his", "him"),
    None: ("It", "it", "Its", "its", "it"),
}


@dataclass
class Sentence:
    text: str
    facts: list[tuple[str, str, str, int]]  # (entity, relation, value, start within the sentence)
    mention: str | None = None  # the name form the sentence used for its entity, if any


@lru_cache(maxsize=None)
def _parse_template(template: str) -> tuple[tuple[str, str | None], ...]:
    """A template as (literal, slot) pieces; the last slot is None."""
    pieces, pos = [], 0
    for m in _SLOT_RE.finditer(template):
        pieces.append((template[pos:m.start()], m[1]))
        pos = m.end()
    pieces.append((template[pos:], None))
    return tuple(pieces)


def _possessive(name: str) -> str:
    return name + "'s"


def _article(word: str) -> str:
    """"a" or "an" by sound: "a university", "an engineer"."""
    w = word.lower()
    if w.startswith(("uni", "use", "eu", "one")):
        return "a"
    return "an" if w[:1] in "aeiou" or w.startswith(("hour", "honor")) else "a"


def render_template(template: str, entity: Entity, mention: str | None = None) -> Sentence:
    """A template filled for ``entity``: the first reference uses ``mention`` (else a pronoun), later ones pronouns.

    Every relation slot becomes a fact with its start offset in the sentence.
    """
    pron = _PRONOUNS[entity.gender]
    out: list[str] = []
    facts: list[tuple[str, str, str, int]] = []
    length = 0
    named = False
    used = None
    for literal, slot in _parse_template(template):
        out.append(literal)
        length += len(literal)
        if slot is None:
            break
        if slot == "N":
            s, named = entity.name, True
        elif slot in ("S", "s", "P", "p", "O"):
            if mention is not None and not named:
                named, used = True, mention
                name = mention[0].upper() + mention[1:] if slot in ("S", "P") else mention
                s = _possessive(name) if slot in ("P", "p") else name
            elif entity.type != "person" and slot in ("s", "O") and not named:
                s, named = "the " + entity.kind, True  # "of the city" reads better than "of it"
            else:
                s = pron["SsPpO".index(slot)]
        elif slot == "is":
            s = "was" if "Death Date" in entity.facts else "is"
        elif slot == "kind":
            s = entity.kind
        elif slot.startswith("a:"):
            target = slot[2:]
            s = _article(entity.kind if target == "kind" else entity.facts[target])
        else:
            s = entity.facts[slot]
            facts.append((entity.name, slot, s, length))
        out.append(s)
        length += len(s)
    return Sentence("".join(out), facts, used)


def _cover(relations: list[str], table: dict[tuple[str, ...], tuple[str, ...]], rng: random.Random) -> list[tuple[str, ...]]:
    """Template keys that together state each relation exactly once (combined keys chosen at random)."""
    remaining = set(relations)
    keys = []
    candidates = [k for k in table if k and set(k) <= remaining]
    while remaining:
        candidates = [k for k in candidates if set(k) <= remaining]
        key = rng.choice(candidates)
        keys.append(key)
        remaining -= set(key)
    return keys


def _name_forms(entity: Entity, text_values: list[str]) -> list[str | None]:
    """How later sentences may refer to the entity: pronoun (None), full name, short form."""
    if entity.type == "person":
        forms: list[str | None] = [None, None, None, None, entity.name]
        if not any(re.search(rf"\b{re.escape(entity.surname)}\b", v) for v in text_values):
            forms.append(entity.surname)  # only when no other name in the document shares the surname
        return forms
    return [None, None, entity.name, "the " + entity.kind]


@dataclass
class Doc:
    kind: str
    category: str
    subject: str | None
    url: str
    sentences: list[Sentence]
    paragraph_breaks: list[int]  # sentence indices that start a new paragraph
    aliases: list[tuple[str, str]] = field(default_factory=list)


def _with_fillers(fixed: list[Sentence], body: list[Sentence], fillers: tuple[str, ...], rng: random.Random,
                  render_filler=lambda t: Sentence(t, [])) -> list[Sentence]:
    """``fixed`` first, then ``body`` and enough fillers (shuffled together) to keep calls <= the target density."""
    words = sum(len(s.text.split()) for s in fixed + body)
    calls = sum(len(s.facts) for s in fixed + body)
    pool = list(fillers)
    rng.shuffle(pool)
    extra = rng.randint(0, 2)  # a little more prose than strictly needed, so lengths vary
    chosen: list[Sentence] = []
    while pool and (100 * calls > TARGET_CALLS_PER_100_WORDS * words or extra > 0):
        if 100 * calls <= TARGET_CALLS_PER_100_WORDS * words:
            extra -= 1
        s = render_filler(pool.pop())
        chosen.append(s)
        words += len(s.text.split())
    if 100 * calls > TARGET_CALLS_PER_100_WORDS * words:
        raise AssertionError("filler pool too small for the call-density target")  # a vocabulary bug
    rest = body + chosen
    rng.shuffle(rest)
    return fixed + rest


def _paragraph_breaks(n: int, rng: random.Random) -> list[int]:
    breaks, i = [], rng.randint(3, 6)
    while i < n - 1:
        breaks.append(i)
        i += rng.randint(3, 6)
    return breaks


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def biography(person: Entity, rng: random.Random) -> Doc:
    """All of the person's facts: an intro with the full name, then shuffled sentences and fillers."""
    intro_table = INTRO_TEMPLATES["person"]
    intro_key = rng.choice([k for k in intro_table if set(k) <= set(person.facts)])
    intro = render_template(rng.choice(intro_table[intro_key]), person)
    table = TEMPLATES["person"]
    forms = _name_forms(person, list(person.facts.values()))
    body = []
    for key in _cover([r for r in person.facts if r not in intro_key], table, rng):
        body.append(render_template(rng.choice(table[key]), person, rng.choice(forms)))
    sentences = _with_fillers([intro], body, FIELDS[person.category].fillers + PERSON_FILLERS, rng,
                              lambda t: render_template(t, person, rng.choice(forms)))
    used_surname = any(s.mention == person.surname for s in sentences)
    return Doc("biography", person.category, person.name, f"{URL_BASE}/people/{_slug(person.name)}",
               sentences, _paragraph_breaks(len(sentences), rng),
               [(person.surname, person.name)] if used_surname else [])


def _mentions(linked: list[Entity], lead_kind: str, exclude: tuple[str, ...], rng: random.Random) -> list[Sentence]:
    """Sentences that name up to MAX_MENTIONS linked entities and restate one or two of their facts."""
    out = []
    for e in rng.sample(linked, min(len(linked), MAX_MENTIONS[lead_kind])):
        table = MENTION_CLAUSES[e.type]
        keys = [k for k in table if not set(k) & set(exclude) and set(k) <= set(e.facts)]
        clause = rng.choice(table[rng.choice(keys)])
        s = render_template(rng.choice(MENTION_LEADS[lead_kind]) + clause + ".", e)
        out.append(s)
    return out


def subject_document(subject: Entity, linked: list[tuple[list[Entity], str, tuple[str, ...]]], rng: random.Random) -> Doc:
    """An organisation or city document: all of the subject's facts, plus mentions of linked entities."""
    intro_table = INTRO_TEMPLATES[subject.type]
    intro_key = rng.choice([k for k in intro_table if set(k) <= set(subject.facts)])
    intro = render_template(rng.choice(intro_table[intro_key]), subject)
    table = TEMPLATES[subject.type]
    forms = _name_forms(subject, [])
    body = [render_template(rng.choice(table[key]), subject, rng.choice(forms))
            for key in _cover([r for r in subject.facts if r not in intro_key], table, rng)]
    for entities, lead_kind, exclude in linked:
        body += _mentions(entities, lead_kind, exclude, rng)
    if subject.type == "city":
        kind, fillers = "city", CITY_FILLERS
        url = f"{URL_BASE}/cities/{_slug(subject.name)}"
    else:
        kind, fillers = "organisation", ORGANISATION_FILLERS
        url = f"{URL_BASE}/organisations/{_slug(subject.name)}"
    sentences = _with_fillers([intro], body, fillers, rng)
    return Doc(kind, subject.category, subject.name, url, sentences, _paragraph_breaks(len(sentences), rng))


def no_fact_document(index: int, rng: random.Random) -> Doc:
    """General prose on an everyday topic, with no tail facts."""
    topic = rng.choice(sorted(NO_FACT_TOPICS))
    pool = NO_FACT_TOPICS[topic]
    sentences = [Sentence(t, []) for t in rng.sample(pool, rng.randint(5, min(9, len(pool))))]
    return Doc("no_facts", "general", None, f"{URL_BASE}/notes/{topic}-{index}", sentences,
               _paragraph_breaks(len(sentences), rng))


def assemble(doc: Doc) -> tuple[str, list[tuple[int, LookupCall, int]]]:
    """The document's text and its gold calls as (call offset, call, value start)."""
    parts: list[str] = []
    calls: list[tuple[int, LookupCall, int]] = []
    length = 0
    breaks = set(doc.paragraph_breaks)
    for i, s in enumerate(doc.sentences):
        if i:
            sep = "\n\n" if i in breaks else " "
            parts.append(sep)
            length += len(sep)
        for entity, relation, value, start in s.facts:
            calls.append((0, LookupCall(entity, relation, value), length + start))
        parts.append(s.text)
        length += len(s.text)
    text = "".join(parts)
    placed = []
    for _, call, start in calls:
        offset = start
        while offset > 0 and text[offset - 1].isspace():  # before the whitespace that precedes the mention
            offset -= 1
        placed.append((offset, call, start))
    placed.sort(key=lambda c: c[2])
    return text, placed


# ---------------------------------------------------------------------------------------------
# Writing.

def _check_config(config: SyntheticCorpusConfig, out_dir: str) -> str:
    if config.compression not in COMPRESSIONS:
        raise UserInputError(
            f"SyntheticCorpusConfig.compression={config.compression!r} is not supported; use one of {', '.join(COMPRESSIONS)}"
        )
    if out_dir.startswith("file://"):
        out_dir = out_dir[len("file://"):]
    if "://" in out_dir:
        raise UserInputError(f"synthetic corpus out_dir {out_dir!r} must be a local folder; generate locally, then copy")
    return out_dir


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gz":
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:  # no name or time: reproducible
            gz.write(data)
        return buf.getvalue()
    if compression == "zst":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


def _write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression=SHARD_COMPRESSION)


def generate_corpus(config: SyntheticCorpusConfig, out_dir: str) -> SyntheticCorpus:
    """Write the synthetic corpus (Dolma JSONL) and its ground truth under ``out_dir``; same seed, same bytes.

    Corpus files left by an earlier run in ``out_dir/corpus`` (``synthetic-bio-*.jsonl*``) are replaced.
    """
    out_dir = _check_config(config, out_dir)
    world = build_world(config)
    rng = random.Random(f"synthetic-bio-docs/{config.seed}")

    docs = [biography(p, rng) for p in world.people]
    # organisation and city documents go first to the subjects with the most links
    alumni = {u.name: [] for u in world.universities}
    staff = {c.name: [] for c in world.companies}
    natives = {c.name: [] for c in world.cities}
    based = {c.name: [] for c in world.cities}
    for p in world.people:
        alumni[p.facts["Alma Mater"]].append(p)
        staff[p.facts["Employer"]].append(p)
        natives[p.facts["Birth City"]].append(p)
    for o in world.universities + world.companies:
        based[o.facts["Headquarters City"]].append(o)
    orgs = world.universities + world.companies
    rng.shuffle(orgs)
    orgs.sort(key=lambda o: -min(len((alumni if o.type == "university" else staff)[o.name]), 3))
    for org in orgs[:config.n_organisation_docs]:
        if org.type == "university":
            linked = [(alumni[org.name], "alumni", ("Alma Mater",))]
        else:
            linked = [(staff[org.name], "staff", ("Employer", "Employer City"))]
        docs.append(subject_document(org, linked, rng))
    cities = list(world.cities)
    rng.shuffle(cities)
    cities.sort(key=lambda c: -min(len(natives[c.name]), 3))
    for city in cities[:config.n_city_docs]:
        linked = [(natives[city.name], "natives", ("Birth City",)), (based[city.name], "based", ("Headquarters City",))]
        docs.append(subject_document(city, linked, rng))
    seen_texts = set()
    for i in range(config.n_no_fact_docs):
        for _ in range(100):  # the ingester drops exact duplicates, so every text must be new
            doc = no_fact_document(i, rng)
            text = assemble(doc)[0]
            if text not in seen_texts:
                break
        else:
            raise AssertionError("no-fact topics too small for distinct documents")
        seen_texts.add(text)
        docs.append(doc)
    rng.shuffle(docs)

    out = Path(out_dir)
    corpus_dir, gt_dir = out / "corpus", out / "ground_truth"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for stale in corpus_dir.glob("synthetic-bio-*.jsonl*"):  # a smaller rerun must not leave old files behind
        stale.unlink()

    width = max(6, len(str(len(docs) - 1)))
    added = (date(2024, 1, 1) + timedelta(days=config.seed % 366)).isoformat() + "T00:00:00.000Z"
    lines_by_file: dict[str, list[bytes]] = {}
    annotated, triplets, documents, people_rows, alias_rows = [], [], [], {}, {}
    n_calls = 0
    texts = set()
    for i, doc in enumerate(docs):
        doc_id = f"synbio-{i:0{width}d}"
        text, calls = assemble(doc)
        if text in texts:
            raise AssertionError(f"duplicate document text: {text[:80]!r}")
        texts.add(text)
        file_name = f"synthetic-bio-{i // config.docs_per_file:05d}{COMPRESSIONS[config.compression]}"
        created = _random_date(rng, date(2010, 1, 1), date(2023, 12, 31)).isoformat() + "T00:00:00.000Z"
        record = {"id": doc_id, "text": text, "source": SOURCE, "added": added, "created": created,
                  "metadata": {"category": doc.category, "url": doc.url, "kind": doc.kind}}
        lines = lines_by_file.setdefault(file_name, [])
        lines.append(orjson.dumps(record) + b"\n")
        documents.append({"doc_id": doc_id, "kind": doc.kind, "category": doc.category, "subject": doc.subject,
                          "url": doc.url, "corpus_file": file_name, "line": len(lines)})
        ann = Annotated(text, tuple(PlacedCall(off, call) for off, call, _ in calls))
        annotated.append({"doc_id": doc_id, "text": text, "annotated_text": render(ann), "n_calls": len(calls),
                          "text_version": 0, "annotator": ANNOTATOR, "annotator_version": ANNOTATOR_VERSION,
                          "prompt_id": None, "category": doc.category, "url": doc.url, "run_id": RUN_ID})
        for off, call, start in calls:
            triplets.append({
                "triplet_id": triplet_id(doc_id, off, call.entity, call.relation, call.value, ANNOTATOR),
                "doc_id": doc_id, "entity": call.entity, "relation": call.relation, "value": call.value,
                "call_offset": off, "value_start": start, "value_end": start + len(call.value),
                "source_url": doc.url, "annotator": ANNOTATOR, "annotator_version": ANNOTATOR_VERSION,
                "prompt_id": None, "run_id": RUN_ID, "confidence": 1.0,
            })
        n_calls += len(calls)
        if doc.kind == "biography":
            people_rows[doc.subject] = doc_id
        for alias, entity in doc.aliases:
            alias_rows[(alias, entity)] = None

    corpus_files = []
    for file_name, lines in lines_by_file.items():
        path = corpus_dir / file_name
        path.write_bytes(_compress(b"".join(lines), config.compression))
        corpus_files.append(str(path))

    kb = [{"entity": e.name, "relation": r, "value": v, "entity_type": e.type}
          for e in _entities(world) for r, v in e.facts.items()]
    paths = {name: gt_dir / f"{name}.parquet" for name in ("annotated", "triplets", "kb", "aliases", "people", "documents")}
    _write_parquet(annotated, ANNOTATED_SCHEMA, paths["annotated"])
    _write_parquet(triplets, TRIPLET_SCHEMA, paths["triplets"])
    _write_parquet(kb, KB_SCHEMA, paths["kb"])
    _write_parquet([{"alias": a, "entity": e} for a, e in alias_rows], ALIAS_SCHEMA, paths["aliases"])
    _write_parquet([{"entity": p.name, "category": p.category, "gender": p.gender,
                     "biography_doc_id": people_rows[p.name], "url": f"{URL_BASE}/people/{_slug(p.name)}"}
                    for p in world.people], PEOPLE_SCHEMA, paths["people"])
    _write_parquet(documents, DOCUMENTS_SCHEMA, paths["documents"])

    by_kind = {k: sum(d.kind == k for d in docs) for k in DOC_KINDS}
    return SyntheticCorpus(
        corpus_files=corpus_files, ground_truth_dir=str(gt_dir), **{k: str(v) for k, v in paths.items()},
        n_people=len(world.people), docs_by_kind=by_kind, n_facts=len(kb), n_calls=n_calls, seed=config.seed,
    )

