"""The embedded world: prompt space, splits, gold judge qualities, demos, corpus, length neutrality."""

import random

import pytest

from spa_ray.tasks.embedded import EmbeddedTask
from spa_ray.tasks.embedded.world import CATEGORIES, COLOURS, DEFAULT_FAMILIES, FAMILIES, World, numbered


@pytest.fixture(scope="module")
def task():
    return EmbeddedTask()


@pytest.fixture(scope="module")
def every_family():
    """A world with the attribute families too (off by default, still supported)."""
    return EmbeddedTask(families=FAMILIES)


def test_prompt_space_is_large_and_distinct(task):
    prompts = task.all_prompts()
    assert len(prompts) == len(set(prompts)) >= 30_000
    kinds = {task.world.spec(p).kind for p in prompts}
    assert kinds == set(DEFAULT_FAMILIES) == {"except2", "except1", "member"}
    # seed set is 3.3% of the space and about 1K pairs or more
    assert len(task.prompt_splits(0).seed) >= 1000


def test_splits_disjoint_and_deterministic(task):
    a, b, c = task.prompt_splits(0), task.prompt_splits(0), task.prompt_splits(1)
    assert a == b
    assert a.seed != c.seed
    sets = a.all_sets()
    flat = [p for xs in sets.values() for p in xs]
    assert len(flat) == len(set(flat))
    assert [len(x) for x in a.iterations] == [1000, 2000] and len(a.evaluation) == 500
    custom = task.prompt_splits(3, n_seed=10, n_iterations=[5, 6, 7], n_evaluation=4)
    assert [len(x) for x in custom.iterations] == [5, 6, 7]
    train = set(task.training_prompts(0))
    assert not train & set(a.evaluation)
    assert set(a.seed) <= train and len(train) == len(prompts := task.all_prompts()) - len(a.evaluation)
    with pytest.raises(ValueError, match="need"):
        task.prompt_splits(0, n_seed=len(prompts))


def test_world_is_deterministic_across_instances():
    w1, w2 = World(0), World(0)
    assert w1.kb.entities == w2.kb.entities
    assert w1.all_prompts()[:50] == w2.all_prompts()[:50]
    assert World(1).kb.entities != w1.kb.entities


def test_seed_pairs_are_gold_ordered_and_deterministic(task):
    prompts = task.prompt_splits(0).seed[:200]
    pairs = task.seed_pairs(prompts, seed=0)
    assert len(pairs) >= 190
    assert pairs == task.seed_pairs(prompts, seed=0)
    assert pairs != task.seed_pairs(prompts, seed=1)
    for p in pairs:
        assert p.chosen_score > p.rejected_score
        assert p.chosen_score == task.score(p.prompt, p.chosen)
        assert p.rejected_score == task.score(p.prompt, p.rejected)


def _items(task, prompt, response):
    toks = response.split()
    body = toks[toks.index(":") + 1:] if ":" in toks else toks[4:]
    return [t for t in body if not t.isdigit() and t != "."]


def test_seed_pair_responses_share_one_draft(task):
    """The two responses of a pair name the same valid items except where a corruption
    (content, repetition, count) changed one: their difference is quality."""
    prompts = [p for p in task.prompt_splits(0).seed if task.world.spec(p).is_list][:300]
    pairs = task.seed_pairs(prompts, seed=0)
    same_items = 0
    for p in pairs:
        a, b = _items(task, p.prompt, p.chosen), _items(task, p.prompt, p.rejected)
        differing = sum(x != y for x, y in zip(a, b))
        # each response changes at most three positions of the shared draft (content, confusion, repetition)
        assert differing <= 6, (p.prompt, p.chosen, p.rejected)
        same_items += differing == 0
    assert same_items > 0.1 * len(pairs)  # independent draws: almost never
    # demonstrations (SFT data) still draw items independently per response
    demos = task.sft_demonstrations(50, seed=0)
    assert len({d.response for d in demos}) == 50


def _list_prompt(task, kind):
    return next(p for p in task.all_prompts() if task.world.spec(p).kind == kind)


def test_families_are_chosen_by_name(task, every_family):
    kinds = {every_family.world.spec(p).kind for p in every_family.all_prompts()}
    assert kinds == set(FAMILIES)
    assert set(task.all_prompts()) < set(every_family.all_prompts())
    assert EmbeddedTask(families=["member"]).all_prompts() == [
        p for p in task.all_prompts() if task.world.spec(p).kind == "member"]
    with pytest.raises(ValueError, match="families must be a non-empty subset"):
        EmbeddedTask(families=["poems"])


@pytest.mark.parametrize("kind", ["except2", "except1", "colours", "colour", "size", "place"])
def test_gold_judge_orders_each_list_quality(every_family, kind):
    task = every_family
    prompt = _list_prompt(task, kind)
    spec = task.world.spec(prompt)
    good_toks = task.world.reference_answer(spec)
    good = " ".join(good_toks)
    items = [t for t in good_toks[5:-1] if not t.isdigit()]
    assert good_toks[5:-1] == numbered(items)
    head = good_toks[:5]
    q = task.quality_scores(prompt, good)
    assert q == {"opening": 1.0, "count": 1.0, "content": 2.0, "repetition": 1.0, "ending": 1.0}
    assert task.score(prompt, good) == 6.0
    valid = task.world.valid_items(spec)
    other = task.world.kb.members["fish" if spec.category != "fish" else "birds"][0]
    bad = {
        "opening": " ".join(["here", "are", str(spec.n + 1), spec.category, ":"] + numbered(items) + ["."]),
        "count_more": " ".join(head + numbered(items + [valid[spec.n]]) + ["."]),
        "count_less": " ".join(head + numbered(items[:-1]) + ["."]),
        "content": " ".join(head + numbered(items[:-1] + [other]) + ["."]),
        "repetition": " ".join(head + numbered(items[:-1] + [items[0]]) + ["."]),
        "ending_missing": " ".join(head + numbered(items)),
        "ending_extra": good + " and more .",
    }
    for what, resp in bad.items():
        assert task.score(prompt, resp) < task.score(prompt, good), what
        assert task.score(prompt, resp) >= 4.0, what  # exactly one quality lost
    # symmetric: one item too many costs exactly what one item too few costs
    assert task.score(prompt, bad["count_more"]) == task.score(prompt, bad["count_less"])
    # content is rate-normalised: one bad item in a longer list costs less than all bad
    assert task.score(prompt, "") == 0.0
    assert task.score(prompt, "garbage words") <= 1.0


def test_gold_judge_excluded_and_filter_items_are_wrong(task, every_family):
    p = _list_prompt(task, "except2")
    spec = task.world.spec(p)
    x, y = spec.excluded
    ok = task.world.valid_items(spec)[: spec.n - 1]
    with_excluded = " ".join(["here", "are", str(spec.n), spec.category, ":", *numbered([*ok, x]), "."])
    assert task.quality_scores(p, with_excluded)["content"] < 2.0
    task = every_family
    p = _list_prompt(task, "colour")
    spec = task.world.spec(p)
    wrong = [e for e in task.world.kb.members[spec.category] if task.world.kb.colour(e) not in spec.colours][0]
    ok = task.world.valid_items(spec)[: spec.n - 1]
    resp = " ".join(["here", "are", str(spec.n), spec.category, ":", *numbered([*ok, wrong]), "."])
    assert task.quality_scores(p, resp)["content"] == pytest.approx(2.0 * (spec.n - 1) / spec.n)


def test_gold_judge_member_facts(task):
    e = task.world.kb.entities[30]
    cat = task.world.kb.category[e]
    wrong = next(c for c in CATEGORIES if c != cat)
    other = task.world.kb.entities[31]
    for p in (f"what kind of thing is {e}", f"tell me what {e} is"):
        assert task.world.spec(p).kind == "member"
        assert task.score(p, f"{e} is one of the {cat} .") == 5.0
        assert task.score(p, f"{e} is one of the {wrong} .") == 2.0
        assert task.score(p, f"{other} is one of the {cat} .") == 4.0
        assert task.score(p, f"{e} is one of the {cat}") == 4.0
        assert task.score(p, f"{e} is one of the {cat} {cat} .") == task.score(p, f"{e} is one of the .") == 2.0


def test_gold_judge_facts(every_family):
    task = every_family
    e = task.world.kb.entities[0]
    colour = task.world.kb.colour(e)
    p = f"what colour is {e}"
    wrong = next(c for c in COLOURS if c != colour)
    other = task.world.kb.entities[1]
    assert task.score(p, f"{e} is {colour} .") == 5.0
    assert task.score(p, f"{e} is {wrong} .") == 2.0
    assert task.score(p, f"{other} is {colour} .") == 4.0
    assert task.score(p, f"{e} is {colour}") == 4.0
    assert task.score(p, f"{e} is {colour} . also .") == 4.0
    # doubled value and missing value cost the same (length-symmetric)
    assert task.score(p, f"{e} is {colour} {colour} .") == task.score(p, f"{e} is .") == 2.0
    place = task.world.kb.place(e)
    assert task.score(f"where does {e} live", f"{e} lives in the {place} .") == 5.0
    with pytest.raises(ValueError, match="not a prompt of the embedded world"):
        task.score("write a poem", "no")


def _length_win_rate(task, prompts, seed):
    """Among gold-labelled demo pairs of different lengths: the share the longer one wins."""
    rng = random.Random(seed)
    longer = shorter = 0
    for p in prompts:
        a, _ = task.world.sample_response(p, rng)
        b, _ = task.world.sample_response(p, rng)
        sa, sb = task.score(p, a), task.score(p, b)
        la, lb = len(a.split()), len(b.split())
        if sa == sb or la == lb:
            continue
        if (la > lb) == (sa > sb):
            longer += 1
        else:
            shorter += 1
    return longer / (longer + shorter), longer + shorter


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_length_confound_in_demo_pairs(task, seed):
    prompts = random.Random(seed).sample(task.all_prompts(), 4000)
    rate, n = _length_win_rate(task, prompts, seed)
    assert n > 1000
    assert 0.4 <= rate <= 0.6, rate


def test_demonstrations_are_mixed_quality(task):
    demos = task.sft_demonstrations(2000, seed=0)
    assert demos == task.sft_demonstrations(2000, seed=0)
    scores = [task.score(d.prompt, d.response) for d in demos]
    best = [6.0 if task.world.spec(d.prompt).is_list else 5.0 for d in demos]
    perfect = sum(s == b for s, b in zip(scores, best)) / len(demos)
    assert 0.15 < perfect < 0.5
    for quality in ["opening", "count", "content", "repetition", "ending"]:
        share = sum(quality in d.meta["corrupted"] for d in demos) / len(demos)
        assert 0.05 < share < 0.45, quality


def test_corpus_carries_membership_not_answer_format(task):
    """The default world's corpus teaches what its judge checks (membership, exclusion,
    counting), never in the list answer format, and no attribute tables."""
    docs = list(task.pretraining_corpus(3000, seed=0))
    assert docs == list(task.pretraining_corpus(3000, seed=0))
    assert not any(d.startswith("here are") for d in docs)
    kb = task.world.kb
    facts = [d.split() for d in docs if len(d.split()) == 7 and d.split()[1:5] == ["is", "one", "of", "the"]]
    assert len(facts) > 100
    assert all(kb.category[t[0]] == t[5] for t in facts)  # the corpus is clean
    assert not any(w in COLOURS for d in docs for w in d.split())
    mentioned = {w for d in docs for w in d.split()}
    assert len(set(kb.entities) & mentioned) > 0.95 * len(kb.entities)


def test_attribute_corpus_carries_facts_not_answer_format(every_family):
    task = every_family
    docs = list(task.pretraining_corpus(3000, seed=0))
    assert docs == list(task.pretraining_corpus(3000, seed=0))
    assert not any(d.startswith("here are") for d in docs)
    kb = task.world.kb
    facts = [d.split() for d in docs if len(d.split()) == 4 and d.split()[1] == "is" and d.split()[2] in COLOURS]
    assert len(facts) > 50
    assert all(kb.colour(t[0]) == t[2] for t in facts)  # the corpus is clean
    mentioned = {w for d in docs for w in d.split()}
    assert len(set(kb.entities) & mentioned) > 0.95 * len(kb.entities)


def test_seed_size_changes_only_the_seed_set(task):
    """Table 3's seed-size ablation: evaluation and iteration sets stay put."""
    from spa_ray.tasks.embedded import EmbeddedTask

    base = task.prompt_splits(0)
    for fraction in (0.008, 0.017, 0.10):
        other = EmbeddedTask(seed_fraction=fraction).prompt_splits(0)
        assert other.evaluation == base.evaluation and other.iterations == base.iterations
        assert len(other.seed) == round(fraction * len(task.all_prompts()))
        assert not set(other.seed) & (set(other.evaluation) | {p for it in other.iterations for p in it})
        small, large = sorted([other.seed, base.seed], key=len)
        assert set(small) <= set(large)


def test_decoys_are_the_sft_datas_systematic_confusion(task):
    """Each category's decoys are other categories' members (the corpus says so); demos
    flagged 'confusion' name one, and the gold judge counts it as a content error."""
    kb = task.world.kb
    every = [d for ds in kb.decoys.values() for d in ds]
    assert len(every) == len(set(every)) == 3 * len(CATEGORIES)
    for cat, ds in kb.decoys.items():
        assert all(kb.category[d] != cat for d in ds)
    assert kb.decoys == World(0).kb.decoys != World(1).kb.decoys
    demos = [d for d in task.sft_demonstrations(1500, seed=0) if task.world.spec(d.prompt).is_list]
    confused = [d for d in demos if "confusion" in d.meta["corrupted"]]
    assert 0.25 < len(confused) / len(demos) < 0.45
    for d in confused:
        if "repetition" in d.meta["corrupted"]:
            continue  # a repeated item may overwrite the decoy
        spec = task.world.spec(d.prompt)
        assert set(d.response.split()) & set(kb.decoys[spec.category]), d.response
        assert task.quality_scores(d.prompt, d.response)["content"] < 2.0
    clean = [d for d in demos if not d.meta["corrupted"]]
    assert not any(set(d.response.split()) & set(kb.decoys[task.world.spec(d.prompt).category]) for d in clean)
