"""Offline stand-in for the fetched corpora: seeded template text with the same structure.

Financial newswire (earnings tables, commodity and trade reports, with a real "grain" label by
construction), dated business headlines carrying lexicon sentiment words, and general news on
unrelated topics. It is text for exercising the pipeline, not for conclusions: the report marks
every number from it as synthetic.
"""
from __future__ import annotations

import random

from megacpt.demo.corpora.raw import RawCorpora

_COMPANIES = ["Acme Holdings", "Borealis Corp", "Cobalt Mining", "Delta Freight", "Everstone Bank",
              "Fairhaven Foods", "Granite Energy", "Harbor Steel", "Ionic Chemicals", "Juniper Retail",
              "Kestrel Airlines", "Lumen Telecom", "Meridian Insurance", "Northgate Motors", "Orchid Pharma"]
_COUNTRIES = ["Brazil", "Canada", "Argentina", "Australia", "France", "India", "Japan", "Egypt", "China",
              "the Soviet Union", "the United States", "Thailand", "Indonesia", "Nigeria", "Mexico"]
_GRAINS = ["wheat", "maize", "corn", "barley", "sorghum", "rice", "oats"]
_GOODS = ["coffee", "cocoa", "sugar", "copper", "crude oil", "tin", "rubber", "cotton"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_POS = ["gain", "gains", "growth", "improve", "improved", "strong", "profitable", "record", "rebound",
        "surge", "boost", "beat", "upgrade", "success"]
_NEG = ["loss", "losses", "decline", "weak", "warns", "slump", "default", "layoffs", "crisis", "cut",
        "downgrade", "fraud", "lawsuit", "bankruptcy"]
_TOPICS = {
    "sport": ["The team won the final after extra time", "The coach praised the young striker",
              "Fans filled the stadium for the season opener", "The champion retained her title in straight sets",
              "Injuries forced the captain to miss the match", "The referee's decision sparked debate"],
    "weather": ["Heavy rain is expected across the north", "Temperatures will climb above average this weekend",
                "A storm warning was issued for coastal towns", "Snow closed several mountain roads",
                "Forecasters predict a dry and sunny week"],
    "politics": ["The minister announced a new education plan", "Lawmakers debated the bill late into the night",
                 "The president met foreign leaders at the summit", "Voters head to the polls next month",
                 "The opposition criticised the government's response"],
    "culture": ["The festival opened with a concert in the park", "Critics praised the museum's new exhibition",
                "The novel tells the story of two sisters", "The film premiered to a standing ovation",
                "Local artists painted murals across the old town"],
    "science": ["Researchers discovered a new species of frog", "The telescope captured images of a distant galaxy",
                "Scientists published a study on sleep and memory", "The probe landed safely on the comet",
                "A new vaccine entered clinical trials"],
}


def _num(rng: random.Random, lo: float, hi: float) -> str:
    return f"{rng.uniform(lo, hi):.1f}"


def _earnings(rng: random.Random) -> tuple[str, int]:
    c = rng.choice(_COMPANIES)
    q = rng.choice(["1ST", "2ND", "3RD", "4TH"])
    lines = [f"{c.upper()} {q} QTR {'NET' if rng.random() < .6 else 'LOSS'}",
             f"Shr {rng.randint(5, 99)} cts vs {rng.randint(5, 99)} cts",
             f"Net {_num(rng, 1, 90)} mln vs {_num(rng, 1, 90)} mln",
             f"Revs {_num(rng, 50, 900)} mln vs {_num(rng, 50, 900)} mln"]
    if rng.random() < .5:
        lines.append(f"NOTE: results include a {rng.choice(['gain', 'charge'])} of {_num(rng, 1, 20)} mln dlrs "
                     f"from the sale of its {rng.choice(['shipping', 'retail', 'chemicals'])} unit.")
    return "\n".join(lines), 0


def _commodity(rng: random.Random, grain: bool) -> tuple[str, int]:
    good = rng.choice(_GRAINS if grain else _GOODS)
    land = rng.choice(_COUNTRIES)
    m = rng.choice(_MONTHS)
    verb = rng.choice(["ROSE", "FELL", "STEADY"])
    sents = [f"{land.upper()} {good.upper()} EXPORTS {verb} IN {m.upper()}",
             f"{land} exported {rng.randint(10, 900)},000 tonnes of {good} in {m}, against "
             f"{rng.randint(10, 900)},000 tonnes a year earlier, the {rng.choice(['trade', 'agriculture'])} "
             f"ministry said."]
    for _ in range(rng.randint(2, 6)):
        sents.append(rng.choice([
            f"Traders said demand from {rng.choice(_COUNTRIES)} remained {rng.choice(['firm', 'weak', 'uncertain'])}.",
            f"Prices for {good} were quoted at {rng.randint(80, 400)} dlrs a tonne, {rng.choice(['up', 'down'])} "
            f"{rng.randint(1, 15)} dlrs from last week.",
            f"The harvest is forecast at {_num(rng, 1, 60)} mln tonnes, officials said.",
            f"Shipments to {rng.choice(_COUNTRIES)} are expected to resume in {rng.choice(_MONTHS)}.",
            f"Stocks at the end of the season were estimated at {_num(rng, 0.5, 9)} mln tonnes.",
        ]))
    return "\n".join(sents), int(grain)


def _headline(rng: random.Random) -> str:
    c = rng.choice(_COMPANIES)
    tone = rng.random()
    if tone < .35:
        return f"{c} shares {rng.choice(['surge', 'rebound', 'climb'])} on {rng.choice(_POS)} in quarterly profit"
    if tone < .7:
        return f"{c} {rng.choice(_NEG)} as {rng.choice(['sales', 'margins', 'orders'])} {rng.choice(['fall', 'slide'])}"
    return f"{c} to {rng.choice(['open', 'move', 'review'])} {rng.choice(['offices', 'operations', 'plans'])} " \
           f"in {rng.choice(_COUNTRIES)}"


def _news(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(_TOPICS))
    sents = [rng.choice(_TOPICS[t]) + "." for t in [topic] * rng.randint(4, 12)]
    return sents[0][:-1], " ".join(sents)


def synthetic_raw(seed: int, n_reuters: int = 900, n_test: int = 300, n_headlines: int = 1600,
                  n_news: int = 1500) -> RawCorpora:
    rng = random.Random(seed)

    def article() -> tuple[str, int]:
        r = rng.random()
        return _earnings(rng) if r < .4 else _commodity(rng, grain=r < .55)

    days = [f"2020-{m:02d}-{d:02d}" for m in range(3, 9) for d in (1, 8, 15, 22)]
    return RawCorpora(
        reuters_train=[article() for _ in range(n_reuters)],
        reuters_test=[article() for _ in range(n_test)],
        headlines=[(_headline(rng), rng.choice(days)) for _ in range(n_headlines)],
        news=[_news(rng) for _ in range(n_news)],
        lexicon_pos=frozenset(_POS), lexicon_neg=frozenset(_NEG), origin="synthetic",
        provenance=[f"synthetic template text generated offline with seed {seed} (megacpt.demo.corpora.synthetic)"],
    )
