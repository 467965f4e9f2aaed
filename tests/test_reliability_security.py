"""Reliability: security defaults, checked on the code and on a started run.

- Nothing unpickles data: no pickle/marshal/dill loads, every ``torch.load`` passes
  ``weights_only=True``, YAML only through ``safe_load``, no eval/exec (an AST audit of
  every Python file of the package, the job, tools and benchmarks).
- Model weights only from safetensors: every model ``from_pretrained`` in the package
  passes ``use_safetensors=True``, vLLM gets ``load_format="safetensors"``, a
  pickle-only folder is refused before anything reads it.
- ``trust_remote_code`` off unless the config asks, and never a literal True.
- The dashboard and job server on 127.0.0.1: the cluster configs say so, no code binds
  0.0.0.0, and the local cluster the driver starts serves its dashboard on 127.0.0.1
  with Ray token authentication on; the README documents it and no file turns it off.
- The run directory is never written outside its root (names with '..', absolute
  parts, and a symlink planted inside the run directory are refused).
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _tiny_model import save_tiny_model_dir
from spa_ray.pipeline.run_dir import RunDirError, RunDirectory

REPO = Path(__file__).resolve().parents[1]
AUDITED = sorted(
    p for d in ("spa_ray", "jobs", "tools", "benchmarks") for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts
)


def _calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                if isinstance(f.value, ast.Name):
                    owner = f.value.id
                elif isinstance(f.value, ast.Attribute):
                    owner = f.value.attr
                else:
                    owner = "<expr>"  # a method of a call's result, e.g. model.from_pretrained(...).eval()
                yield node, owner, f.attr
            elif isinstance(f, ast.Name):
                yield node, "", f.id


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def test_audit_finds_the_files():
    assert len(AUDITED) > 40 and REPO / "spa_ray" / "training" / "worker.py" in AUDITED


def test_no_unpickling_anywhere():
    problems = []
    for path in AUDITED:
        rel = path.relative_to(REPO)
        for node, owner, name in _calls(path):
            where = f"{rel}:{node.lineno}"
            if owner in ("pickle", "cloudpickle", "dill", "marshal", "joblib") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if owner == "torch" and name == "load":
                value = _kw(node, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
                problems.append(f"{where}: yaml.{name} (use yaml.safe_load)")
            if owner == "" and name in ("eval", "exec"):
                problems.append(f"{where}: {name}()")
            if owner == "np" and name == "load" and not (
                isinstance(_kw(node, "allow_pickle"), ast.Constant) and _kw(node, "allow_pickle").value is False
            ):
                problems.append(f"{where}: np.load without allow_pickle=False")
    assert problems == []


def test_weights_are_loaded_from_safetensors_only():
    problems = []
    for path in AUDITED:
        rel = path.relative_to(REPO)
        if rel.parts[0] != "spa_ray":
            continue
        for node, owner, name in _calls(path):
            if name == "from_pretrained" and "Tokenizer" not in owner and "Config" not in owner:
                value = _kw(node, "use_safetensors")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{rel}:{node.lineno}: model from_pretrained without use_safetensors=True")
    assert problems == []
    vllm = (REPO / "spa_ray/generation/vllm_backend.py").read_text()
    assert 'load_format="safetensors"' in vllm


def test_pickle_only_model_folder_is_refused_without_unpickling(tmp_path):
    import torch
    from safetensors.torch import load_file

    from spa_ray.models.loading import ModelLoadError, check_model_folder, load_causal_lm

    folder = save_tiny_model_dir(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()

    class Boom:  # unpickling this would run code; it must never be unpickled
        def __reduce__(self):
            return (Path(tmp_path / "unpickled").touch, ())

    torch.save({"state": state, "payload": Boom()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin: pickle checkpoints are refused"):
        check_model_folder(folder)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_causal_lm(folder)
    assert not (tmp_path / "unpickled").exists()


def test_trust_remote_code_is_off_unless_asked():
    from spa_ray.pipeline.config import SPAConfig, load_config

    assert SPAConfig().model.trust_remote_code is False
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code is True
    literal_true = []
    for path in AUDITED:
        for node, _, name in _calls(path):
            value = _kw(node, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                literal_true.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}(trust_remote_code=True)")
    assert literal_true == []


def test_cluster_configs_bind_the_dashboard_to_localhost_and_keep_token_auth():
    configs = sorted((REPO / "clusters").glob("*.yaml"))
    assert configs
    for path in configs:
        text = path.read_text()
        assert "0.0.0.0" not in text, path
        hosts = [line for line in text.splitlines() if "dashboard-host" in line or "dashboard_host" in line]
        assert hosts and all("127.0.0.1" in h for h in hosts), (path, hosts)
        assert "RAY_AUTH_MODE" in text and "RAY_AUTH_MODE=disabled" not in text, path
        for line in text.splitlines():
            if "ray start" in line and not line.strip().startswith("#") and "ray stop" not in line:
                assert "RAY_AUTH_MODE=token" in line, (path, line)
    everywhere = [p for p in AUDITED + configs if "0.0.0.0" in p.read_text() or "RAY_AUTH_MODE=disabled" in p.read_text()]
    assert everywhere == []
    readme = (REPO / "README.md").read_text()
    assert "token authentication" in readme and "127.0.0.1" in readme and "trust_remote_code" in readme


def test_the_drivers_local_cluster_serves_on_localhost_with_token_auth(tmp_path):
    """Run.open as the job does (no address: a local cluster), then ask Ray what it bound."""
    model = save_tiny_model_dir(tmp_path / "m")
    fixture = REPO / "tests" / "fixtures" / "ultrafeedback_tiny.jsonl"
    code = textwrap.dedent(f"""
        import json, ray
        from spa_ray.pipeline.config import load_config
        from spa_ray.pipeline.stages import Run
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
        config = load_config(None, ["run.root={tmp_path / 'runs'}", "model.name_or_path={model}",
            "data.task=spa_ray.tasks.ultrafeedback:UltraFeedbackTask", "data.task_kwargs={{dataset: '{fixture}'}}", "audit.pairs=0"])
        with Run.open(config):
            info = ray._private.worker._global_node.address_info
            print("RESULT", json.dumps({{"webui_url": info.get("webui_url"), "token": is_token_auth_enabled()}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    for _ in range(3):  # a Ray head that cannot start on an overloaded machine is not under test here
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        if "timed out during startup" not in r.stderr:
            break
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    import json

    result = json.loads(lines[0][len("RESULT "):])
    assert result["token"] is True
    assert result["webui_url"] in (None, "") or result["webui_url"].split(":")[0] in ("127.0.0.1", "localhost"), result


@pytest.mark.parametrize("bad", ["..", "../x", "a/../../b", "/etc/passwd", "a\\..\\b"])
def test_run_directory_refuses_names_that_escape(tmp_path, bad):
    run = RunDirectory(tmp_path, "r")
    with pytest.raises(RunDirError):
        run.subpath("data", bad)
    with pytest.raises(RunDirError):
        run.write_text(bad, "x")
    with pytest.raises(RunDirError):
        with run.stage_dir("gen_1", "data", bad):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_symlink_inside_the_run_directory_cannot_lead_writes_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = RunDirectory(tmp_path / "runs", "r")
    (run.path / "data").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunDirError, match="outside the run directory"):
        run.subpath("data", "iter_1")
    with pytest.raises(RunDirError, match="outside the run directory"):
        with run.stage_dir("gen_1", "data", "iter_1", "generations"):
            pass
    assert list(outside.iterdir()) == []
