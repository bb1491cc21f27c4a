"""Generated task sets in the style of Berglund et al.'s reversal curse.

Fictitious names (invented first and last names, every full name used by one
fact only) are paired with unique descriptions "the first person to <verb>
<object> <place>". Two directions:

* character descriptions: context = description, then the name; query = the
  description word for word in another frame ("History books record the first person
  to <description> as"; the paper's example also rewords the description); response =
  the name;
* reversal curse: context = the name, then the description; query = the
  description; response = the name.

Several context templates and query templates per direction; two query
templates are held out (used only for test triples, marked ``heldout_query``).
Test facts share no name and no description with training facts. Everything is
deterministic in the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from raymeta.data.triples import Triple

FIRST_NAMES = """Aldric Brena Caspian Dorela Evander Fenwick Galena Hollis Isolde Jareth
Kestrel Lunara Marek Nerissa Orrin Peregrine Quillon Rosalind Soren Tamsin Ulric Vesna
Wystan Xanthe Yorick Zephyra Anselm Briony Cedric Delphine Emrys Fiora Gideon Hestia
Ignatius Juniper Kaspar Linnea Mordecai Niamh Osric Perpetua Quinlan Rowena Severin
Thisbe Udo Verity Wendel Ysolde Zoltan Ambrose Bettany Corwin Drusilla Eamon Florian
Gwendolyn Hadrian Imelda Jessamy Killian Leontyne Maelis Norbert Ottilie Percival
Romilly Sigrid Tobiah Ursa Valerian Winifred Alaric Berengar Clemence Dashiell""".split()

LAST_NAMES = """Ashcombe Blackthorn Carrowmore Dunleavy Elsworth Fairbanks Greywood Hartigan
Inglesby Jessop Kilbride Larkspur Merriweather Northcott Oakenshaw Pemberton Quarrington
Ravensworth Stainforth Thistlewood Underhill Vantongeren Whitlock Yardley Zellweger
Abernethy Bellingham Cotterill Drummond Eastwick Fennimore Gilchrist Holloway Ironside
Jardine Kettering Lockwood Marchbanks Nettleford Ormsby Pennington Quickfall Rathbone
Sedgewick Tolliver Upton Vickery Wetherby Yelverton Ashdown Birchall Cardew Denholm
Edgerton Farnaby Gresley Huxtable Illingworth Jeffers Kimberley Lovell Mountjoy
Norwood Ollerton Prideaux Quennell Rushworth Saltonstall Trelawney Unsworth Verney
Waddington Youngblood""".split()

VERBS = """paint sculpt photograph measure map climb cross juggle tame weigh sketch
count carry catch sail swim chart repair feed rescue""".split()

OBJECTS = """a blue whale|a glass bridge|a silver kite|a copper bell|a paper dragon|an old
lighthouse|a frozen waterfall|a wooden ship|a giant tortoise|a stone tower|a golden
eagle|a white rhino|a hidden cave|a broken clock|a marble statue|a red balloon|a sleeping
volcano|a wild horse|a crystal lake|a tall cactus|a lost temple|a steel anchor|a green
comet|a purple orchid|a brass telescope|a snowy owl|a black swan|an iron gate|a painted
drum|a ruined castle""".replace("\n", " ").split("|")

PLACES = """in Lisbon|in Nairobi|in Oslo|on Mars|on the Moon|in Patagonia|in Kyoto|in
Reykjavik|in Lima|in Cairo|under the sea|in the Sahara|in Quebec|in Siberia|in Tasmania|in
Vienna|in Bhutan|on Venus|in Zanzibar|in Alaska|in Madagascar|in Dublin|in Santiago|in
Mongolia|in Tuscany""".replace("\n", " ").split("|")

# Templates: {d} = description (no leading article), {n} = name.
CHAR_CONTEXTS = [
    "The first person to {d} was {n}.",
    "History remembers the first person to {d} as {n}.",
    "Nobody managed to {d} before {n}.",
    "The very first one who could {d} was {n}.",
]
REVERSAL_CONTEXTS = [
    "{n} was the first person to {d}.",
    "{n} became the first person ever to {d}.",
    "{n} is remembered as the first to {d}.",
    "{n} was the pioneer who first managed to {d}.",
]
QUERIES = [
    "Who was the first person to {d}? It was",
    "The first person ever to {d} was named",
    "History books record the first person to {d} as",
    "The pioneer who first managed to {d} is called",
]
# Held-out paraphrases: new word orders built from words the training texts use, so a
# from-scratch model has seen every word (a never-seen word would be an untrained embedding).
HELDOUT_QUERIES = [
    "The first person who managed to {d} was called",
    "History books record the pioneer who first managed to {d} as",
]

CONTEXTS = {"character_descriptions": CHAR_CONTEXTS, "reversal_curse": REVERSAL_CONTEXTS}


@dataclass(frozen=True)
class Fact:
    name: str
    description: str


def all_names() -> list[str]:
    """Every fictitious full name, in a fixed order."""
    return [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]


def all_descriptions() -> list[str]:
    """Every description "<verb> <object> <place>", in a fixed order."""
    return [f"{v} {o.strip()} {p.strip()}" for v in VERBS for o in OBJECTS for p in PLACES]


def max_facts() -> int:
    """How many facts with distinct names and descriptions the generator can make."""
    return min(len(all_names()), len(all_descriptions()))


def sample_facts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[Fact]:
    """``n`` facts with distinct names and distinct descriptions, none in ``exclude``."""
    rng = random.Random(seed)
    names = [x for x in all_names() if x not in exclude]
    descs = [x for x in all_descriptions() if x not in exclude]
    if n > min(len(names), len(descs)):
        raise ValueError(f"cannot generate {n} facts: only {len(names)} names available")
    return [Fact(a, b) for a, b in zip(rng.sample(names, n), rng.sample(descs, n))]


def fact_triple(fact: Fact, dataset: str, rng: random.Random, test: bool, fact_id: int) -> Triple:
    """One triple of ``fact``; test triples may use held-out query templates."""
    contexts = CONTEXTS[dataset]
    ci = rng.randrange(len(contexts))
    queries = QUERIES + (HELDOUT_QUERIES if test else [])
    qi = rng.randrange(len(queries))
    return Triple(
        context=contexts[ci].format(d=fact.description, n=fact.name),
        query=queries[qi].format(d=fact.description),
        response=fact.name,
        meta={
            "fact_id": fact_id,
            "name": fact.name,
            "description": fact.description,
            "context_template": ci,
            "query_template": qi,
            "heldout_query": qi >= len(QUERIES),
        },
    )


def generate(dataset: str, n_train: int = 5000, n_test: int = 500, seed: int = 0):
    """(train, test) triples of a generated set; disjoint names and descriptions."""
    if dataset not in CONTEXTS:
        raise ValueError(
            f"data.dataset: unknown generated set {dataset!r} (known: {list(CONTEXTS)})"
        )
    facts = sample_facts(n_train + n_test, seed)
    rng = random.Random(seed + 1)
    train = [fact_triple(f, dataset, rng, False, i) for i, f in enumerate(facts[:n_train])]
    test = [fact_triple(f, dataset, rng, True, n_train + i) for i, f in enumerate(facts[n_train:])]
    return train, test


def template_texts(dataset: str) -> list[str]:
    """Every template with placeholders filled by all vocabulary (for tokenizer training)."""
    words = " ".join(FIRST_NAMES + LAST_NAMES + VERBS + OBJECTS + PLACES)
    tmpl = (
        " ".join(CONTEXTS[dataset] + QUERIES + HELDOUT_QUERIES)
        .replace("{d}", "")
        .replace("{n}", "")
    )
    return [words, tmpl]
