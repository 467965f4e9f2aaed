"""The embedded tiny model: tokenizer, chat template, build cache, from_pretrained round trip.

The seconds-scale TINY_BUILD exercises the same code path as the default build; the
default build itself (a few minutes) is one ``slow`` test.
"""

import json
import os
import threading

import pytest
import torch

from spa_ray.tasks.embedded import EmbeddedTask
from spa_ray.tasks.embedded.build import (
    TINY_BUILD,
    BuildSpec,
    build_embedded_model,
    build_tokenizer,
    cache_root,
    prompt_ids,
    response_ids,
)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded-cache")
    path = build_embedded_model(cache_dir=root, spec=TINY_BUILD, log=lambda m: None)
    return root, path


def test_tokenizer_round_trip_and_chat_template():
    task = EmbeddedTask()
    demos = task.sft_demonstrations(300, seed=0)
    tok = build_tokenizer(list(task.pretraining_corpus(500)) + [d.prompt + " " + d.response for d in demos],
                          extra_words=task.world.kb.entities)
    for d in demos[:50]:
        ids = tok(d.response, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == d.response
    text = tok.apply_chat_template([{"role": "user", "content": demos[0].prompt}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == f"<s><|user|> {demos[0].prompt} <|assistant|>"
    ids = prompt_ids(tok, demos[0].prompt)
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"
    r = response_ids(tok, demos[0].response)
    assert r[-1] == tok.eos_token_id
    assert tok.decode(ids + r, skip_special_tokens=True) == f"{demos[0].prompt} {demos[0].response}"
    assert {tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token} == {"<s>", "</s>", "<pad>", "<unk>"}


def test_tiny_build_reloads_via_from_pretrained_and_generates(tiny_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, path = tiny_build
    assert path.name == "sft" and (path / "model.safetensors").exists()
    assert (path.parent / "pretrained" / "model.safetensors").exists()
    info = json.loads((path.parent / "build.json").read_text())
    assert info["key"] == TINY_BUILD.key() and info["timings"]["total_s"] > 0
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.chat_template
    task = EmbeddedTask()
    prompts = task.prompt_splits(0).evaluation[:3]
    tok.padding_side = "left"
    batch = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
                                    padding=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=8,
                         pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(texts) == 3
    for p, t in zip(prompts, texts):
        assert isinstance(task.score(p, t), float)


def test_cache_is_reused_and_leaves_no_temp(tiny_build):
    root, path = tiny_build
    called = []
    again = build_embedded_model(cache_dir=root, spec=TINY_BUILD, log=called.append)
    assert again == path and called == []  # nothing rebuilt, nothing logged
    # passing the (default) task itself resolves to the same cache entry
    assert build_embedded_model(cache_dir=root, spec=TINY_BUILD, task=EmbeddedTask(), log=called.append) == path
    assert called == []
    pre = build_embedded_model(cache_dir=root, spec=TINY_BUILD, which="pretrained")
    assert pre == path.parent / "pretrained"
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]


def test_concurrent_builders_build_once(tmp_path):
    spec = BuildSpec(model=TINY_BUILD.model, train=TINY_BUILD.train.__class__(
        pretrain_docs=200, sft_demos=100, pretrain_batch=8, sft_batch=8))
    logs: list[list[str]] = [[], []]
    paths = [None, None]

    def run(i):
        paths[i] = build_embedded_model(cache_dir=tmp_path, spec=spec, log=logs[i].append)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert paths[0] == paths[1]
    assert sum(any("building" in m for m in lg) for lg in logs) == 1


def test_cache_key_and_root(monkeypatch, tmp_path):
    assert BuildSpec().key() != TINY_BUILD.key()
    assert BuildSpec().key() == BuildSpec().key()
    monkeypatch.setenv("SPA_RAY_CACHE", str(tmp_path))
    assert cache_root() == tmp_path / "embedded"
    assert cache_root("/x") == type(tmp_path)("/x")
    with pytest.raises(ValueError, match="which"):
        build_embedded_model(cache_dir=tmp_path, spec=TINY_BUILD, which="nope")


@pytest.mark.slow
def test_default_build_learns_the_world(tmp_path):
    """The real build (pretraining + SFT + tokenizer) teaches the knowledge and the format.

    Its time is a benchmark figure (``python -m spa_ray.tasks.embedded.build`` prints it,
    docs/world.md records it), not an assertion here.
    """
    cache = os.environ.get("SPA_RAY_TEST_FRESH_BUILD") and tmp_path
    path = build_embedded_model(cache_dir=cache or None)
    info = json.loads((path.parent / "build.json").read_text())
    print("embedded build timings:", info["timings"])
    assert info["probe_pretrained"]["membership_accuracy"] > 0.9  # pretraining taught category membership
    assert info["probe_sft"]["sample_mean_gold"] > 4.5  # SFT taught the answer format (max 6)
