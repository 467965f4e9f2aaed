"""The embedded world: a made-up knowledge base, its prompt space, a gold judge, and
generators for the pretraining corpus and the mixed-quality SFT demonstrations.

Everything here is pure Python and deterministic from integer seeds (``random.Random``
seeded with integers or strings; never ``hash()``, which is salted per process).

Knowledge base: ``N_CATEGORIES`` categories ("birds", "fruits", ...) of
``PER_CATEGORY`` made-up entity words each; every entity has a colour (balanced within
its category), a size (balanced) and a place (north/south/east/west).

Prompt families (all text lower-case, tokens separated by single spaces); the default
world (v5) uses ``DEFAULT_FAMILIES``, whose every quality the pretrained model can know:
- ``except2``:  "list 3 fruits except bazo and kimut"
- ``except1``:  "name 4 fruits except bazo"
- ``member``:   "what kind of thing is bazo" / "tell me what bazo is"
and, available but off by default (their colour/size/place knowledge is not learned by
the tiny model -- judged at chance, docs/world.md "World v4"):
- ``colours``:  "name 3 fruits that are red or blue"
- ``colour``:   "give 2 fruits that are red"
- ``size``:     "list 4 large fruits except bazo"
- ``place``:    "name 3 fruits that live in the north"
- ``fact``:     "what colour is bazo" / "tell me the colour of bazo" (colour, size, place)

Answer format: list prompts -> "here are 3 fruits : 1 bazo 2 kimut 3 lera ."; facts ->
"bazo is one of the fruits ." / "bazo is red ." / "bazo lives in the north .".

Gold judge (``gold_score``): a sum of independent qualities, like UltraFeedback's
aspects. List prompts: opening (1: "here are <n> <category> :"), count (1: exactly n
items), content (2 x the FRACTION of items that satisfy the instruction: member,
filter, not excluded), no repetition (1), ending (1: a single final "."). Max 6. Facts:
opening (1), correct (3: the value words are exactly the true value), ending (1). Max 5.
Length neutrality by construction: count errors are symmetric (n-1 and n+1 cost the
same), content is rate-normalised, ending errors come as a missing "." (shorter) or
trailing words after it (longer) with equal probability; measured in the tests and
benchmarks/world_check.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

__all__ = [
    "KnowledgeBase",
    "PromptSpec",
    "World",
    "DemoQuality",
    "CATEGORIES",
    "COLOURS",
    "SIZES",
    "PLACES",
    "FAMILIES",
    "DEFAULT_FAMILIES",
]

CATEGORIES = ["birds", "fruits", "tools", "stones", "fish", "trees", "boats", "drinks"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black"]
SIZES = ["small", "large"]
PLACES = ["north", "south", "east", "west"]
NUMBERS = [str(i) for i in range(0, 10)]
LIST_VERBS = ["list", "name", "give", "show"]
FACT_ATTRS = ["colour", "size", "place"]
#: every prompt family the world can make, and the default world's (v5) choice
FAMILIES = ("except2", "except1", "member", "colours", "colour", "size", "place", "fact")
DEFAULT_FAMILIES = ("except2", "except1", "member")
#: families whose gold judge needs colour/size/place knowledge (the corpus then teaches it)
ATTRIBUTE_FAMILIES = {"colours", "colour", "size", "place", "fact"}
#: habitual confusions per category (``KnowledgeBase.decoys``)
DECOYS_PER_CATEGORY = 3
#: share of content errors that name an item the prompt excluded (a copy from the prompt);
#: the rest name another category's member or, for attribute filters, one failing the filter
EXCLUDED_SHARE = 1 / 3

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "ch", "tr", "bl", "gr", "kl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "m", "k", "s"]

# words the templates use: entity names must never collide with them
TEMPLATE_WORDS = set(
    CATEGORIES + COLOURS + SIZES + PLACES + NUMBERS + LIST_VERBS
    + "here are except and or that the live lives in is what tell me of colour size where does "
      "one a an some more also . : , ? all not are group kind thing catalogue these known as has".split()
    + "zero one two three four five six seven".split()
)


def numbered(items: Sequence[str]) -> list[str]:
    """["a", "b"] -> ["1", "a", "2", "b"]: the answer format numbers its items."""
    return [t for i, item in enumerate(items) for t in (str(i + 1), item)]


def _rng(*parts) -> random.Random:
    """A Random seeded from a readable tuple (stable across processes and Python runs)."""
    return random.Random("|".join(str(p) for p in parts))


@dataclass(frozen=True)
class KnowledgeBase:
    """Entities with category, colour, size and place; fixed by ``world_seed``."""

    world_seed: int = 0
    per_category: int = 24

    @cached_property
    def _tables(self):
        rng = _rng("kb", self.world_seed, self.per_category)
        names: list[str] = []
        seen = set(TEMPLATE_WORDS)
        n_total = len(CATEGORIES) * self.per_category
        while len(names) < n_total:
            syl = rng.choice([2, 2, 3])
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syl)) + rng.choice(_CODAS)
            if w not in seen and 4 <= len(w) <= 9:
                seen.add(w)
                names.append(w)
        members: dict[str, list[str]] = {}
        category, colour, size, place = {}, {}, {}, {}
        for ci, cat in enumerate(CATEGORIES):
            ents = names[ci * self.per_category : (ci + 1) * self.per_category]
            members[cat] = ents
            cols = [COLOURS[i % len(COLOURS)] for i in range(len(ents))]
            sizes = [SIZES[i % len(SIZES)] for i in range(len(ents))]
            places = [PLACES[i % len(PLACES)] for i in range(len(ents))]
            rng.shuffle(cols)
            rng.shuffle(sizes)
            rng.shuffle(places)
            for e, c, s, p in zip(ents, cols, sizes, places):
                category[e], colour[e], size[e], place[e] = cat, c, s, p
        return members, category, colour, size, place

    @cached_property
    def decoys(self) -> dict[str, list[str]]:
        """Per category, ``DECOYS_PER_CATEGORY`` members of other categories that the SFT
        demonstrations habitually list in it: a systematic misconception of the SFT data
        (the corpus states their true category). One per other category, no entity twice."""
        rng = _rng("decoys", self.world_seed, self.per_category)
        used: set[str] = set()
        out: dict[str, list[str]] = {}
        for i, cat in enumerate(CATEGORIES):
            others = [CATEGORIES[(i + k) % len(CATEGORIES)] for k in range(1, DECOYS_PER_CATEGORY + 1)]
            out[cat] = []
            for other in others:
                e = rng.choice([m for m in self.members[other] if m not in used])
                used.add(e)
                out[cat].append(e)
        return out

    @property
    def members(self) -> dict[str, list[str]]:
        return self._tables[0]

    @property
    def category(self) -> dict[str, str]:
        return self._tables[1]

    @property
    def entities(self) -> list[str]:
        return [e for cat in CATEGORIES for e in self.members[cat]]

    def attr(self, entity: str, name: str) -> str:
        i = FACT_ATTRS.index(name)
        return self._tables[2 + i][entity]

    def colour(self, e: str) -> str:
        return self._tables[2][e]

    def size(self, e: str) -> str:
        return self._tables[3][e]

    def place(self, e: str) -> str:
        return self._tables[4][e]


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks. ``kind``: one of ``FAMILIES``; facts have an ``attribute``."""

    text: str
    kind: str
    category: str = ""
    n: int = 0
    excluded: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()
    size: str = ""
    place: str = ""
    entity: str = ""
    attribute: str = ""  # fact prompts: colour | size | place | category

    @property
    def is_list(self) -> bool:
        return not self.attribute


@dataclass(frozen=True)
class DemoQuality:
    """Per-quality corruption probabilities of the SFT demonstrations / seed-pair responses.

    Each is drawn independently, so every combination occurs. ``confusion`` is not a
    quality of its own: it names one of the category's habitual decoys in place of a valid
    item (a content error the gold judge scores like any other), the SFT data's systematic
    habit -- one learnable direction per decoy, which DPO must see each decoy to remove.
    """

    opening: float = 0.15
    count: float = 0.25
    content: float = 0.25
    repetition: float = 0.10
    ending: float = 0.20
    confusion: float = 0.35

    def as_dict(self) -> dict[str, float]:
        return dict(opening=self.opening, count=self.count, content=self.content,
                    repetition=self.repetition, ending=self.ending, confusion=self.confusion)


@dataclass
class World:
    """The embedded task's world: knowledge base, prompts, gold judge, corpus, demos."""

    world_seed: int = 0
    per_category: int = 24
    quality: DemoQuality = field(default_factory=DemoQuality)
    families: tuple[str, ...] = DEFAULT_FAMILIES

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families!r}")
        self.families = tuple(f for f in FAMILIES if f in self.families)  # canonical order
        self.kb = KnowledgeBase(self.world_seed, self.per_category)
        self._specs: dict[str, PromptSpec] | None = None

    # ------------------------------------------------------------------ prompts
    def _member_filter(self, spec: PromptSpec):
        kb = self.kb
        if spec.kind in ("except2", "except1"):
            return lambda e: e not in spec.excluded
        if spec.kind in ("colours", "colour"):
            return lambda e: kb.colour(e) in spec.colours
        if spec.kind == "size":
            return lambda e: kb.size(e) == spec.size and e not in spec.excluded
        if spec.kind == "place":
            return lambda e: kb.place(e) == spec.place
        raise ValueError(spec.kind)

    def valid_items(self, spec: PromptSpec) -> list[str]:
        ok = self._member_filter(spec)
        return [e for e in self.kb.members[spec.category] if ok(e)]

    def _enumerate(self) -> list[PromptSpec]:
        kb, on = self.kb, set(self.families)
        out: list[PromptSpec] = []
        for cat in CATEGORIES:
            ents = kb.members[cat]
            for verb in LIST_VERBS:
                if "except2" in on:  # n 2..5, every unordered pair of excluded members
                    for i, x in enumerate(ents):
                        for y in ents[i + 1 :]:
                            for n in (2, 3, 4, 5):
                                out.append(PromptSpec(f"{verb} {n} {cat} except {x} and {y}", "except2", cat, n, (x, y)))
                if "except1" in on:
                    for x in ents:
                        for n in (2, 3, 4, 5):
                            out.append(PromptSpec(f"{verb} {n} {cat} except {x}", "except1", cat, n, (x,)))
                for ci, c1 in enumerate(COLOURS):  # colours and colour interleave (the v2-v4 prompt order)
                    if "colours" in on:
                        for c2 in COLOURS[ci + 1 :]:
                            for n in (2, 3, 4, 5):
                                out.append(PromptSpec(f"{verb} {n} {cat} that are {c1} or {c2}", "colours", cat, n, (),
                                                      (c1, c2)))
                    if "colour" in on:
                        for n in (2, 3):
                            out.append(PromptSpec(f"{verb} {n} {cat} that are {c1}", "colour", cat, n, (), (c1,)))
                if "size" in on:
                    for sz in SIZES:
                        for x in ents:
                            for n in (2, 3, 4, 5):
                                out.append(PromptSpec(f"{verb} {n} {sz} {cat} except {x}", "size", cat, n, (x,), (), sz))
                if "place" in on:
                    for pl in PLACES:
                        for n in (2, 3, 4):
                            out.append(PromptSpec(f"{verb} {n} {cat} that live in the {pl}", "place", cat, n, place=pl))
        for e in kb.entities:
            if "fact" in on:
                out.append(PromptSpec(f"what colour is {e}", "fact", entity=e, attribute="colour"))
                out.append(PromptSpec(f"tell me the colour of {e}", "fact", entity=e, attribute="colour"))
                out.append(PromptSpec(f"what size is {e}", "fact", entity=e, attribute="size"))
                out.append(PromptSpec(f"tell me the size of {e}", "fact", entity=e, attribute="size"))
                out.append(PromptSpec(f"where does {e} live", "fact", entity=e, attribute="place"))
                out.append(PromptSpec(f"tell me where {e} lives", "fact", entity=e, attribute="place"))
            if "member" in on:
                out.append(PromptSpec(f"what kind of thing is {e}", "member", entity=e, attribute="category"))
                out.append(PromptSpec(f"tell me what {e} is", "member", entity=e, attribute="category"))
        # every list prompt must be satisfiable
        for s in out:
            if s.is_list:
                assert len(self.valid_items(s)) >= s.n + 1, s
        return out

    @property
    def specs(self) -> dict[str, PromptSpec]:
        if self._specs is None:
            self._specs = {s.text: s for s in self._enumerate()}
        return self._specs

    def all_prompts(self) -> list[str]:
        """Every distinct prompt, in a fixed order."""
        return list(self.specs)

    def spec(self, prompt: str) -> PromptSpec:
        try:
            return self.specs[prompt.strip()]
        except KeyError:
            raise ValueError(f"not a prompt of the embedded world: {prompt!r}") from None

    # --------------------------------------------------------------- gold judge
    def reference_answer(self, spec: PromptSpec, rng: random.Random | None = None) -> list[str]:
        """A perfect answer as a token list (random valid items when ``rng`` is given)."""
        if spec.is_list:
            valid = self.valid_items(spec)
            items = rng.sample(valid, spec.n) if rng else valid[: spec.n]
            return ["here", "are", str(spec.n), spec.category, ":", *numbered(items), "."]
        return self._fact_opening(spec.entity, spec.attribute) + self._fact_value(spec.entity, spec.attribute) + ["."]

    @staticmethod
    def _fact_opening(entity: str, attribute: str) -> list[str]:
        if attribute == "category":
            return [entity, "is", "one", "of", "the"]
        return [entity, "lives", "in", "the"] if attribute == "place" else [entity, "is"]

    def _fact_value(self, entity: str, attribute: str) -> list[str]:
        if attribute == "category":
            return [self.kb.category[entity]]
        return [self.kb.attr(entity, attribute)]

    def quality_scores(self, prompt: str, response: str) -> dict[str, float]:
        """The gold judge's components (each already weighted); their sum is the score."""
        spec = self.spec(prompt)
        toks = response.split()
        ending = 1.0 if toks and toks[-1] == "." and toks.count(".") == 1 else 0.0
        if not spec.is_list:
            opening_toks = self._fact_opening(spec.entity, spec.attribute)
            k = len(opening_toks)
            opening = 1.0 if toks[:k] == opening_toks else 0.0
            body = toks[k:]  # a wrong opening of the right length does not also cost correctness
            values = body[: body.index(".")] if "." in body else body
            correct = 3.0 if values == self._fact_value(spec.entity, spec.attribute) else 0.0
            return {"opening": opening, "correct": correct, "ending": ending}
        head = ["here", "are", str(spec.n), spec.category, ":"]
        opening = 1.0 if toks[:5] == head else 0.0
        if ":" in toks:
            items = toks[toks.index(":") + 1 :]
        else:
            items = toks[4:]
        if "." in items:
            items = items[: items.index(".")]
        items = [t for t in items if not t.isdigit()]  # numbered list: "1 bazo 2 kimut"
        count = 1.0 if len(items) == spec.n else 0.0
        ok = self._member_filter(spec)
        members = set(self.kb.members[spec.category])
        valid = [i for i in items if i in members and ok(i)]
        content = 2.0 * len(valid) / len(items) if items else 0.0
        repetition = 1.0 if items and len(set(items)) == len(items) else 0.0
        return {"opening": opening, "count": count, "content": content, "repetition": repetition, "ending": ending}

    def gold_score(self, prompt: str, response: str) -> float:
        return float(sum(self.quality_scores(prompt, response).values()))

    # ------------------------------------------------------------ demonstrations
    def _invalid_item(self, spec: PromptSpec, rng: random.Random, avoid: Sequence[str]) -> str:
        kb = self.kb
        ok = self._member_filter(spec)
        if spec.excluded and rng.random() < EXCLUDED_SHARE:
            return rng.choice([e for e in spec.excluded if e not in avoid] or list(spec.excluded))
        choices = []
        wrong_attr = [e for e in kb.members[spec.category] if not ok(e) and e not in spec.excluded and e not in avoid]
        if wrong_attr:
            choices.append(wrong_attr)
        other = [c for c in CATEGORIES if c != spec.category]
        choices.append(kb.members[rng.choice(other)])
        return rng.choice(rng.choice(choices))

    def sample_response(
        self, prompt: str, rng: random.Random, items_rng: random.Random | None = None
    ) -> tuple[str, dict[str, bool]]:
        """A demonstration with each quality corrupted independently (see ``DemoQuality``).

        ``items_rng`` (default ``rng``) draws only which valid items are named: two calls
        given copies of one ``items_rng`` state answer from the same draft and differ only
        in their corruptions (how seed pairs are made). Returns (response, {quality: corrupted?}).
        """
        spec = self.spec(prompt)
        items_rng = rng if items_rng is None else items_rng
        q = self.quality
        flags = {k: rng.random() < p for k, p in q.as_dict().items()}
        kb = self.kb
        if spec.is_list:
            valid = self.valid_items(spec)
            n_items = spec.n
            if flags["count"]:
                n_items = spec.n + (1 if rng.random() < 0.5 else -1)
            # one draw of n+1 items, cut to the count: two responses from one draft share a prefix
            items = items_rng.sample(valid, min(spec.n + 1, len(valid)))[:n_items]
            if flags["content"]:
                k = rng.randrange(len(items))
                items[k] = self._invalid_item(spec, rng, items)
            if flags["confusion"]:  # a habitual decoy in place of a still-valid item
                ok = [i for i, item in enumerate(items) if item in valid] or list(range(len(items)))
                fresh = [d for d in kb.decoys[spec.category] if d not in items]
                items[rng.choice(ok)] = rng.choice(fresh)
            if flags["repetition"] and len(items) >= 2:
                i, j = rng.sample(range(len(items)), 2)
                items[j] = items[i]
            else:
                flags["repetition"] = False
            head = ["here", "are", str(spec.n), spec.category, ":"]
            if flags["opening"]:
                if rng.random() < 0.5:
                    head[2] = str(spec.n + rng.choice([-1, 1]))
                else:
                    head[3] = rng.choice([c for c in CATEGORIES if c != spec.category])
            toks = head + numbered(items) + ["."]
        else:
            opening = self._fact_opening(spec.entity, spec.attribute)
            value = self._fact_value(spec.entity, spec.attribute)
            if flags["content"]:
                pool = {"colour": COLOURS, "size": SIZES, "place": PLACES, "category": CATEGORIES}[spec.attribute]
                value = [rng.choice([v for v in pool if v != value[0]])]
            if flags["count"]:  # doubled value (longer) or missing value (shorter), equally likely
                value = value * 2 if rng.random() < 0.5 else []
            if flags["opening"]:
                others = kb.members[kb.category[spec.entity]]
                opening = [rng.choice([e for e in others if e != spec.entity])] + opening[1:]
            flags["repetition"] = flags["confusion"] = False
            toks = opening + value + ["."]
        if flags["ending"]:
            if rng.random() < 0.5:
                toks = toks[:-1]
            else:
                toks = toks + rng.choice([["and", "more", "."], ["also", "."], ["here", "are", "more", "."]])
        return " ".join(toks), flags

    # ---------------------------------------------------------------- corpus
    def corpus_documents(self, n: int, seed: int = 0) -> Iterator[str]:
        """``n`` short clean documents stating the knowledge base in several forms.

        Never in the answer format ("here are <n> <category> :"), so SFT still has to
        teach the format while the facts, membership and counting come from here.
        """
        rng = _rng("corpus", self.world_seed, seed)
        if not set(self.families) & ATTRIBUTE_FAMILIES:
            yield from self._membership_corpus(n, rng)
            return
        kb = self.kb
        ents = kb.entities
        for _ in range(n):
            r = rng.random()
            e = rng.choice(ents)
            cat = kb.category[e]
            if r < 0.45:  # single facts, several phrasings
                form = rng.randrange(7)
                if form == 0:
                    yield f"{e} is one of the {cat} ."
                elif form == 1:
                    yield f"{e} is {kb.colour(e)} ."
                elif form == 2:
                    yield f"{e} is {kb.size(e)} ."
                elif form == 3:
                    yield f"{e} lives in the {kb.place(e)} ."
                elif form == 4:
                    yield f"the colour of {e} is {kb.colour(e)} ."
                elif form == 5:
                    yield f"{e} is a {kb.size(e)} {kb.colour(e)} one of the {cat} and lives in the {kb.place(e)} ."
                else:
                    yield f"{e} is {kb.colour(e)} and {kb.size(e)} ."
            elif r < 0.75:  # catalogue lines: subsets of a category under a filter, all correct
                form = rng.randrange(5)
                members = kb.members[cat]
                if form == 0:
                    pool, label = members, f"the {cat} are"
                elif form == 1:
                    c = kb.colour(e)
                    pool, label = [m for m in members if kb.colour(m) == c], f"the {c} {cat} are"
                elif form == 2:
                    s = kb.size(e)
                    pool, label = [m for m in members if kb.size(m) == s], f"the {s} {cat} are"
                elif form == 3:
                    p = kb.place(e)
                    pool, label = [m for m in members if kb.place(m) == p], f"the {cat} that live in the {p} are"
                else:
                    c1, c2 = rng.sample(COLOURS, 2)
                    pool, label = [m for m in members if kb.colour(m) in (c1, c2)], f"the {cat} that are {c1} or {c2} are"
                k = rng.randint(2, min(6, len(pool)))
                yield f"{label} " + " ".join(rng.sample(pool, k)) + " and more ."
            elif r < 0.88:
                yield _counted_group(rng, kb.members[cat], cat, max_k=6)
            else:  # exclusions: what is not in a group
                yield _exclusion(rng, kb.members[cat], cat, rng.sample(kb.members[cat], 2), max_k=5)

    def _membership_corpus(self, n: int, rng: random.Random) -> Iterator[str]:
        """The corpus of a world without attribute families: membership, groups, exclusions.

        Everything its gold judge checks (membership, exclusion, counting) is taught here, in
        forms other than the answer format, and nothing else: with colour/size/place facts
        in the mix as well, 40K documents left membership unlearned (probe 0.10, world v5's
        first build), while this corpus taught it at 30K (probe 1.00, docs/world.md).
        """
        kb = self.kb
        ents = kb.entities
        for _ in range(n):
            r = rng.random()
            e = rng.choice(ents)
            cat = kb.category[e]
            members = kb.members[cat]
            if r < 0.30:  # membership facts
                form = rng.randrange(3)
                if form == 0:
                    yield f"{e} is one of the {cat} ."
                elif form == 1:
                    yield f"{e} is one of the {cat} and {rng.choice(members)} is one of the {cat} ."
                else:
                    other = rng.choice([c for c in CATEGORIES if c != cat])
                    yield f"{e} is not one of the {other} , {e} is one of the {cat} ."
            elif r < 0.50:  # catalogue lines
                k = rng.randint(2, 7)
                yield f"the {cat} are " + " ".join(rng.sample(members, k)) + " and more ."
            elif r < 0.70:
                yield _counted_group(rng, members, cat, max_k=7)
            else:  # exclusions: what is not in a group (one or two excluded)
                yield _exclusion(rng, members, cat, rng.sample(members, rng.choice([1, 2])), max_k=6)


_NUM_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _counted_group(rng: random.Random, members: list[str], cat: str, max_k: int) -> str:
    """'a group of 3 fruits : a b c .' or 'a b c are three fruits .' (the count word matches)."""
    k = rng.randint(1, max_k)
    items = rng.sample(members, k)
    if rng.random() < 0.5:
        return f"a group of {k} {cat} : " + " ".join(items) + " ."
    return " ".join(items) + f" are {_NUM_WORDS[k]} {cat} ."


def _exclusion(rng: random.Random, members: list[str], cat: str, excluded: list[str], max_k: int) -> str:
    """'all fruits except x and y : a b and more .' -- what is not in a group."""
    rest = [m for m in members if m not in excluded]
    k = rng.randint(1, max_k)
    return f"all {cat} except {' and '.join(excluded)} : " + " ".join(rng.sample(rest, k)) + " and more ."
