"""Tiny offline SQuAD and WikiText files (invented text) in the data sets' own formats.

``write_squad_fixture(dir)`` writes ``train-v1.1.json`` and ``dev-v1.1.json`` (official
SQuAD v1.1 nested JSON); ``write_wikitext_fixture(dir)`` writes ``wiki.train.raw``,
``wiki.valid.raw`` and ``wiki.test.raw`` (WikiText raw format). Rows that the filters of
:mod:`raymeta.data.hf_sets` must drop are planted on purpose; with the default filter
(max_context_chars=2000, max_answer_words=10) the SQuAD fixture keeps 36 of 42 train
questions (drops: 1 no_answer, 1 empty_answer, 1 long_answer, 2 long_context,
1 duplicate) and 19 of 21 dev questions (1 empty_answer, 1 duplicate).

Regenerate the committed copies with
``python -m raymeta.data.fixtures examples/data``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (title, paragraph, [(question, answers)]); answers: a list of texts (dev: several).
SQUAD_TRAIN = [
    (
        "Harrowgate_Lighthouse",
        "The Harrowgate Lighthouse stands on a granite spur at the northern tip of the island "
        "of Callum Reach. It was designed by the engineer Miriam Todd and first lit in 1861. "
        "The tower is 38 metres tall and is painted in red and white bands. Its original lamp "
        "burned whale oil, but it was converted to electricity in 1923. The last resident "
        "keeper, Arthur Penrose, left the station in 1978, after which the light was automated. "
        "Today the keeper's cottage houses a small museum of shipwrecks.",
        [
            ("Who designed the Harrowgate Lighthouse?", ["Miriam Todd"]),
            ("When was the Harrowgate Lighthouse first lit?", ["1861"]),
            ("How tall is the tower of the Harrowgate Lighthouse?", ["38 metres"]),
            ("What did the original lamp burn?", ["whale oil"]),
            ("In what year was the light converted to electricity?", ["1923"]),
            ("Who was the last resident keeper?", ["Arthur Penrose"]),
            ("What does the keeper's cottage house today?", ["a small museum of shipwrecks"]),
            # planted: long_answer (more than 10 words)
            (
                "What happened after the last keeper left?",
                [
                    "The last resident keeper, Arthur Penrose, left the station in 1978, "
                    "after which the light was automated"
                ],
            ),
        ],
    ),
    (
        "Velmar_cheese",
        "Velmar is a hard cheese made in the high valleys of the Oster range. It is produced "
        "from the milk of Tarn goats, a breed kept only in three villages. The curd is pressed "
        "in beech moulds and aged for at least fourteen months in limestone caves. A mature "
        "wheel weighs about nine kilograms and has a dark brown rind. Velmar received protected "
        "status in 2004. The largest annual fair for the cheese is held in the village of "
        "Bressa every October.",
        [
            ("Where is Velmar made?", ["the high valleys of the Oster range"]),
            ("Which animal's milk is used to make Velmar?", ["Tarn goats"]),
            ("What wood are the Velmar moulds made of?", ["beech"]),
            ("How long is Velmar aged?", ["at least fourteen months"]),
            ("How much does a mature wheel of Velmar weigh?", ["about nine kilograms"]),
            ("When did Velmar receive protected status?", ["2004"]),
            ("Where is the largest annual Velmar fair held?", ["Bressa"]),
            # planted: empty_answer
            ("What colour is Velmar inside?", [""]),
            # planted: duplicate of the second question
            ("Which animal's milk is used to make Velmar?", ["Tarn goats"]),
        ],
    ),
    (
        "Orrin_Vale",
        "Orrin Vale was a composer born in the port city of Lisk in 1902. He studied the organ "
        "with Helena Marsh before moving to the capital at the age of nineteen. His best known "
        "work, the Salt Choir Mass, was first performed in 1931 by a choir of two hundred "
        "fishermen. Vale wrote four symphonies and more than sixty songs. He spent his final "
        "years teaching at the Conservatory of Dunmore, where he died in 1968.",
        [
            ("In which city was Orrin Vale born?", ["Lisk"]),
            ("When was Orrin Vale born?", ["1902"]),
            ("With whom did Orrin Vale study the organ?", ["Helena Marsh"]),
            ("What is Orrin Vale's best known work?", ["the Salt Choir Mass"]),
            ("Who first performed the Salt Choir Mass?", ["a choir of two hundred fishermen"]),
            ("How many symphonies did Orrin Vale write?", ["four"]),
            ("Where did Orrin Vale teach in his final years?", ["the Conservatory of Dunmore"]),
            # planted: no_answer
            ("What was Orrin Vale's favourite instrument?", []),
        ],
    ),
    (
        "Quillon_River",
        "The Quillon River rises in the Fenwick Hills and flows south for 212 kilometres before "
        "reaching the Amber Sea. Its largest tributary is the Sorrel, which joins it at the town "
        "of Midford. The river was canalised between 1840 and 1856 to carry coal from the hill "
        "mines. Otters returned to its upper reaches in the 1990s after a long clean-up "
        "campaign. Every spring the towns along its banks hold a race of wooden rafts called "
        "the Quillon Run.",
        [
            ("Where does the Quillon River rise?", ["the Fenwick Hills"]),
            ("How long is the Quillon River?", ["212 kilometres"]),
            ("Into which sea does the Quillon River flow?", ["the Amber Sea"]),
            ("What is the largest tributary of the Quillon?", ["the Sorrel"]),
            ("At which town does the Sorrel join the Quillon?", ["Midford"]),
            ("What was the canalised Quillon used to carry?", ["coal"]),
            ("When did otters return to the upper Quillon?", ["the 1990s"]),
            ("What is the raft race on the Quillon called?", ["the Quillon Run"]),
        ],
    ),
    (
        "Brightwater_Observatory",
        "The Brightwater Observatory was founded in 1897 by the astronomer Celia Hart. Its main "
        "telescope, a refractor with a 71 centimetre lens, was built by the firm of Lund and "
        "Sons. In 1912 staff at the observatory discovered the comet now known as Hart-Ellison. "
        "The observatory closed to research in 1985 because of light pollution from the nearby "
        "city of Garrick. It reopened in 2001 as a public science centre.",
        [
            ("Who founded the Brightwater Observatory?", ["Celia Hart"]),
            ("When was the Brightwater Observatory founded?", ["1897"]),
            ("How wide is the lens of the Brightwater telescope?", ["71 centimetre"]),
            ("Which firm built the Brightwater telescope?", ["Lund and Sons"]),
            ("What comet was discovered at Brightwater in 1912?", ["Hart-Ellison"]),
            ("Why did the Brightwater Observatory close to research?", ["light pollution"]),
            ("What did the Brightwater Observatory become in 2001?", ["a public science centre"]),
        ],
    ),
]

TESSLY_EVENTS = [
    "granted a charter to the guild of ropemakers",
    "built a stone wall along the eastern harbour",
    "paved the market square with river cobbles",
    "opened a school for the children of sailors",
    "bought a bell for the tower of Saint Anselm",
    "forbade the keeping of pigs inside the walls",
    "hired a physician to treat the plague sick",
    "dredged the river mouth for larger ships",
    "founded an almshouse for widows of fishermen",
    "raised a tax on salt to repair the bridge",
    "appointed the first keeper of the town records",
    "planted an avenue of lime trees by the quay",
    "rebuilt the granary after a great fire",
    "banned gambling in the taverns of the port",
    "sent a ship of wool to the fair at Carrow",
    "made peace with the neighbouring town of Elst",
    "ordered lanterns to be hung on every street",
    "dug a new well beside the cattle market",
    "set up a court to settle disputes between merchants",
    "welcomed a company of travelling players",
]
TESSLY = " ".join(
    f"In the year {1401 + 3 * i} the council of Tessly {e}, after a long debate among the aldermen."
    for i, e in enumerate(TESSLY_EVENTS)
)
# planted: long_context (the paragraph is longer than 2000 characters)
SQUAD_TRAIN.append(
    (
        "Annals_of_Tessly",
        TESSLY,
        [
            (
                "Which guild received a charter from the council of Tessly?",
                ["the guild of ropemakers"],
            ),
            ("Which town made peace with Tessly?", ["Elst"]),
        ],
    )
)

SQUAD_DEV = [
    (
        "Marrow_Pass_Railway",
        "The Marrow Pass Railway is a narrow gauge line that climbs from Ketter to the mining "
        "town of Holm. Construction began in 1889 and took eleven years because of repeated "
        "rockfalls. The line passes through 14 tunnels, the longest of which is the Grey Tunnel "
        "at 1,240 metres. Steam locomotives were replaced by diesel engines in 1962. Since 1994 "
        "the railway has been run by a volunteer society.",
        [
            ("Where does the Marrow Pass Railway start?", ["Ketter", "Ketter", "from Ketter"]),
            ("What town does the Marrow Pass Railway reach?", ["Holm", "the mining town of Holm"]),
            ("When did construction of the railway begin?", ["1889", "1889", "1889"]),
            ("How long did construction take?", ["eleven years", "eleven years"]),
            ("How many tunnels does the line pass through?", ["14", "14 tunnels", "14"]),
            ("What is the longest tunnel on the line?", ["the Grey Tunnel", "Grey Tunnel"]),
            ("When were the steam locomotives replaced?", ["1962", "1962"]),
            ("Who has run the railway since 1994?", ["a volunteer society", "volunteer society"]),
        ],
    ),
    (
        "Pellan_glass",
        "Pellan glass is a blue glass first made on the island of Pellan in the sixteenth "
        "century. Its colour comes from cobalt ore mined on the island's western cliffs. "
        "Glassmakers were forbidden to leave the island until 1702, to keep the recipe secret. "
        "The most famous surviving piece is the Harbour Bowl, now in the city museum of Vantry.",
        [
            ("What colour is Pellan glass?", ["blue", "blue", "blue glass"]),
            ("Where was Pellan glass first made?", ["the island of Pellan", "Pellan"]),
            ("What gives Pellan glass its colour?", ["cobalt ore", "cobalt"]),
            ("Until when were glassmakers forbidden to leave Pellan?", ["1702", "1702"]),
            ("Why were glassmakers forbidden to leave Pellan?", ["to keep the recipe secret"]),
            (
                "What is the most famous surviving piece of Pellan glass?",
                ["the Harbour Bowl", "Harbour Bowl"],
            ),
            # planted: duplicate of the first question
            ("What colour is Pellan glass?", ["blue", "blue"]),
        ],
    ),
    (
        "Ida_Brennan",
        "Ida Brennan was a long-distance swimmer who crossed the Strait of Corran in 1934. The "
        "crossing of 34 kilometres took her nineteen hours. She trained in the cold waters of "
        "Lake Aven and was coached by her father, a fisherman. After retiring she founded a "
        "swimming school in Port Elm.",
        [
            ("What strait did Ida Brennan cross?", ["the Strait of Corran", "Strait of Corran"]),
            ("When did Ida Brennan cross the strait?", ["1934", "1934"]),
            ("How long did Ida Brennan's crossing take?", ["nineteen hours", "nineteen hours"]),
            ("Who coached Ida Brennan?", ["her father", "her father, a fisherman"]),
            # planted: empty_answer (the first answer is blank, a later one is not)
            ("Where did Ida Brennan train?", [" ", "Lake Aven"]),
            ("Where did Ida Brennan found a swimming school?", ["Port Elm", "Port Elm"]),
        ],
    ),
]


def squad_json(articles: list, prefix: str) -> dict:
    """The official v1.1 structure; ``answer_start`` is the answer's offset in the paragraph."""
    data, n = [], 0
    for title, context, qas in articles:
        rows = []
        for question, answers in qas:
            n += 1
            spans = [
                {"text": a, "answer_start": max(context.find(a), 0) if a.strip() else 0}
                for a in answers
            ]
            rows.append({"id": f"{prefix}{n:04d}", "question": question, "answers": spans})
        data.append({"title": title, "paragraphs": [{"context": context, "qas": rows}]})
    return {"version": "1.1", "data": data}


def write_squad_fixture(dir: str | Path) -> Path:
    """Write ``train-v1.1.json`` and ``dev-v1.1.json`` into ``dir``; returns ``dir``."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, articles, prefix in (
        ("train-v1.1.json", SQUAD_TRAIN, "tr"),
        ("dev-v1.1.json", SQUAD_DEV, "dv"),
    ):
        text = json.dumps(squad_json(articles, prefix), ensure_ascii=False)
        (out / name).write_text(text + "\n", encoding="utf-8")
    return out


# WikiText raw format (see ``raw_format``): " = Title = " headings, " = = Section = = "
# sub-headings, " " empty lines around them, tokens separated by spaces, @-@ / @,@ / @.@
# inside words. The texts below omit the leading and trailing space of every line.
WIKI_TRAIN = """\

= Kestrel Bridge =

The Kestrel Bridge is a 1 @,@ 200 @-@ metre suspension bridge across the Dunmore estuary . It was opened in 1931 by the mayor , Agnes Holt . The main span is 540 metres long and hangs from two steel cables .

= = History = =

Plans for a crossing were first drawn up in 1896 by the engineer J. R. Carver . The estuary was then crossed by a ferry that carried 2 @.@ 5 million passengers a year . Work on the bridge began in 1926 and employed 900 men . The cost was high .

Tolls were charged until 1970 .

= = Design = =

The towers are made of granite from the quarry at St. Brede , and each weighs about 30 @,@ 000 tonnes . The deck was the first in the country to use welded steel ( rather than rivets ) throughout . Engineers called the design " the harp " because of the pattern of its hangers .

= Marsh Wren ( ship ) =

Marsh Wren was a three @-@ masted schooner built at Elsby in 1874 for the timber trade . She carried pine from the northern forests to the shipyards of the south coast for forty years . In 1915 she was requisitioned by the navy and used as a supply ship .

= = Loss = =

On 3 March 1921 Marsh Wren ran aground on the Cullen Bank in a gale . Her crew of eleven were rescued by the lifeboat from Port Elm . The wreck can still be seen at low tide .

= Ada Fenwick =

Ada Fenwick ( 1850 – 1922 ) was a botanist who catalogued the mosses of the western isles . She was the first woman to be elected to the Society of Naturalists in 1889 . Her collection of 14 @,@ 000 specimens is kept at the university herbarium . Fenwick 's notebooks were published in three volumes after her death .

"""

WIKI_VALID = """\

= Lantern Fair =

The Lantern Fair is held every winter in the old town of Mirren . Hundreds of paper lanterns are hung along the river walls on the longest night of the year . The custom is said to date from a flood in 1640 .

"""

WIKI_TEST = """\

= Corran Lighthouse =

The Corran Lighthouse is a 46 @-@ metre tower on the southern cape of the Strait of Corran . It was first lit in 1872 and was designed by the engineer Thomas Reid . Its light can be seen from 40 @.@ 5 kilometres away in clear weather .

= = Keepers = =

The station had three keepers until it was automated in 1984 . The last principal keeper was Walter Innes , who had served there for 22 years . It was lonely .

Visitors may climb the tower in summer .

"""


def write_wikitext_fixture(dir: str | Path) -> Path:
    """Write ``wiki.train.raw``, ``wiki.valid.raw`` and ``wiki.test.raw`` into ``dir``."""
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("wiki.train.raw", WIKI_TRAIN),
        ("wiki.valid.raw", WIKI_VALID),
        ("wiki.test.raw", WIKI_TEST),
    ):
        (out / name).write_text(raw_format(text), encoding="utf-8")
    return out


def raw_format(text: str) -> str:
    """Give every line WikiText's leading and trailing space (blank lines become " ")."""
    return "".join(f" {line} \n" if line else " \n" for line in text.split("\n")[:-1])


def main(argv: list[str]) -> None:
    """``python -m raymeta.data.fixtures ROOT``: write ROOT/squad_tiny and ROOT/wikitext_tiny."""
    root = Path(argv[0] if argv else "examples/data")
    print(write_squad_fixture(root / "squad_tiny"))
    print(write_wikitext_fixture(root / "wikitext_tiny"))


if __name__ == "__main__":
    main(sys.argv[1:])
