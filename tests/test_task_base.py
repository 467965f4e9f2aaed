"""The Task interface: load_task by import path, its errors, and PromptSplits checks."""

import sys
import types

import pytest

from spa_ray.tasks.base import PreferencePair, PromptSplits, Task, TaskLoadError, load_task
from spa_ray.tasks.embedded import EmbeddedTask


class _MiniTask(Task):
    name = "mini"

    def __init__(self, k: int = 1):
        self.k = k

    def prompt_splits(self, seed=0, n_seed=None, n_iterations=None, n_evaluation=None):
        return PromptSplits(seed=["a"], iterations=[["b"]], evaluation=["c"], data_seed=seed)

    def seed_pairs(self, prompts, seed=0):
        return [PreferencePair(p, "good", "bad", 1.0, 0.0) for p in prompts]

    def score(self, prompt, response):
        return float(response == "good")

    def sft_demonstrations(self, n=None, seed=0):
        return []


class _Abstract(Task):
    pass


class _NotATask:
    pass


@pytest.fixture
def fake_module():
    mod = types.ModuleType("spa_fake_tasks_mod")
    mod.MiniTask = _MiniTask
    mod.Abstract = _Abstract
    mod.NotATask = _NotATask
    mod.instance = _MiniTask(k=7)
    mod.factory = lambda k=3: _MiniTask(k)
    mod.bad_factory = lambda: 42
    mod.number = 5
    sys.modules[mod.__name__] = mod
    yield mod.__name__
    del sys.modules[mod.__name__]


def test_load_embedded_task_by_default_path():
    task = load_task("spa_ray.tasks.embedded:EmbeddedTask")
    assert isinstance(task, EmbeddedTask)
    task2 = load_task("spa_ray.tasks.embedded.task:EmbeddedTask", n_evaluation=100)
    assert task2.default_evaluation == 100


def test_load_user_task_class_factory_instance(fake_module):
    assert load_task(f"{fake_module}:MiniTask", k=4).k == 4
    assert load_task(f"{fake_module}:factory", k=5).k == 5
    assert load_task(f"{fake_module}:instance").k == 7
    assert load_task(f"{fake_module}:MiniTask").score("x", "good") == 1.0


@pytest.mark.parametrize(
    "path, needle",
    [
        ("spa_ray.tasks.embedded.EmbeddedTask", "pkg.module:ClassName"),
        ("a:b:c", "pkg.module:ClassName"),
        (":EmbeddedTask", "pkg.module:ClassName"),
        ("spa_ray.tasks.embedded:", "pkg.module:ClassName"),
        ("no_such_pkg_xyz.mod:Task", "cannot import module 'no_such_pkg_xyz.mod'"),
        ("spa_ray.tasks.embedded:NoSuchTask", "has no attribute 'NoSuchTask'"),
    ],
)
def test_load_task_bad_paths_name_the_path(path, needle):
    with pytest.raises(TaskLoadError) as err:
        load_task(path)
    assert needle in str(err.value)
    assert repr(path) in str(err.value) or "pkg.module:ClassName" in str(err.value)


def test_load_task_wrong_kinds(fake_module):
    with pytest.raises(TaskLoadError, match="not a subclass of spa_ray.tasks.base.Task"):
        load_task(f"{fake_module}:NotATask")
    with pytest.raises(TaskLoadError, match="is abstract"):
        load_task(f"{fake_module}:Abstract")
    with pytest.raises(TaskLoadError, match="not a Task class or factory"):
        load_task(f"{fake_module}:number")
    with pytest.raises(TaskLoadError, match="returned int, not a Task"):
        load_task(f"{fake_module}:bad_factory")
    with pytest.raises(TaskLoadError, match="takes no keyword arguments"):
        load_task(f"{fake_module}:instance", k=1)
    with pytest.raises(TaskLoadError, match="cannot construct"):
        load_task(f"{fake_module}:MiniTask", nope=1)
    assert issubclass(TaskLoadError, ImportError)


def test_prompt_splits_must_be_disjoint():
    with pytest.raises(ValueError, match="'b' is in both 'seed' and 'iteration_1'"):
        PromptSplits(seed=["a", "b"], iterations=[["b"]], evaluation=["c"])
    with pytest.raises(ValueError, match="twice in 'evaluation'"):
        PromptSplits(seed=["a"], iterations=[], evaluation=["c", "c"])
    ok = PromptSplits(seed=["a"], iterations=[["b"], ["d"]], evaluation=["c"])
    assert list(ok.all_sets()) == ["seed", "iteration_1", "iteration_2", "evaluation"]


def test_optional_methods_have_clear_defaults():
    t = _MiniTask()
    with pytest.raises(NotImplementedError, match="no pretraining corpus"):
        t.pretraining_corpus()
    assert t.score_many(["x", "y"], ["good", "bad"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        t.score_many(["x"], [])
    assert t.describe()["class"].endswith(":_MiniTask")
    assert t.default_model() is None
