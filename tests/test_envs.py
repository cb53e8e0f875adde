"""The per-rule conda environments: they parse, pin what the package pins, and every rule that runs uses one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
ENVS = {"cpu": REPO / "envs" / "cpu.yaml", "gpu": REPO / "envs" / "gpu.yaml"}
# Not needed inside a job: Snakemake itself runs the workflow, outside the rules' environments.
WORKFLOW_ONLY = {"snakemake"}


def constraints() -> dict[str, str]:
    """requirements/constraints.txt as canonical name -> pinned version."""
    pins = {}
    for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def runtime_requirements() -> dict[str, Requirement]:
    """pyproject's runtime dependencies (not the extras) as canonical name -> requirement."""
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in project()["dependencies"]}


def env_packages(env: dict) -> tuple[dict[str, str], list]:
    """The pip pins of an environment (canonical name -> version) and its conda dependencies."""
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip_lists) == 1, "one pip: list"
    pins = {}
    for line in pip_lists[0]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"{line!r} is not pinned as name==version"
        pins[canonicalize_name(match[1])] = match[2]
    return pins, conda


@pytest.mark.parametrize("kind", sorted(ENVS))
def test_env_pins_the_packages_and_versions_of_the_project(kind: str):
    env = yaml.safe_load(ENVS[kind].read_text())
    assert env["name"] == f"sraseg-{kind}"
    assert "conda-forge" in env["channels"]
    pins, conda = env_packages(env)

    # The same packages as the project's runtime dependencies; faiss for the GPU in the GPU environment.
    # The stand-in encoder's wheel comes from the post-deploy script (it must skip its dependencies).
    expected = set(runtime_requirements()) - WORKFLOW_ONLY
    post_deploy = ENVS[kind].with_name(f"{kind}.post-deploy.sh").read_text()
    lines = (REPO / "requirements" / "standin.txt").read_text().replace("\\\n", " ").splitlines()
    pin, digest = next(line for line in lines if line.strip() and not line.startswith("#")).split()
    assert "--no-deps" in post_deploy and f"{pin} {digest}" in post_deploy, "post-deploy and standin.txt differ"
    if kind == "gpu":
        expected = expected - {"faiss-cpu"} | {"faiss-gpu"}
    assert set(pins) == expected

    # The same versions as the tested set, and inside the project's ranges.
    tested = constraints()
    requirements = runtime_requirements()
    for name, version in pins.items():
        if name == "faiss-gpu":  # not in the CPU-tested set: same version as faiss-cpu
            assert version == tested["faiss-cpu"]
            assert version in requirements["faiss-cpu"].specifier
            continue
        assert version == tested[name], name
        if name in requirements:
            assert version in requirements[name].specifier, name

    # A Python the project supports, pinned to a minor version.
    python = [d for d in conda if d.startswith("python")]
    assert len(python) == 1 and "pip" in conda
    minor = re.fullmatch(r"python=(3\.\d+)", python[0])
    assert minor, python
    assert f"{minor[1]}.0" in SpecifierSet(project()["requires-python"])


def test_envs_differ_only_in_faiss():
    cpu, _ = env_packages(yaml.safe_load(ENVS["cpu"].read_text()))
    gpu, _ = env_packages(yaml.safe_load(ENVS["gpu"].read_text()))
    assert set(cpu.items()) ^ set(gpu.items()) == {("faiss-cpu", cpu["faiss-cpu"]), ("faiss-gpu", gpu["faiss-gpu"])}


def workflow_rules() -> list:
    """The workflow's rules as Snakemake parses them (the default config)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(), snakefile=REPO / "workflow" / "Snakefile", workdir=REPO
        )
        return list(workflow._workflow.rules)  # the parsed rules are only reachable through the Workflow object


def test_every_rule_that_runs_a_command_has_a_conda_env():
    rules = workflow_rules()
    commands = [r for r in rules if r.shellcmd or r.is_run or r.script or r.notebook or r.wrapper]
    assert len(commands) >= 10
    # The rest are target-only rules (all, prepared, generator): inputs, nothing to run.
    assert all(not r.output for r in rules if r not in commands)
    for rule in commands:
        assert rule.conda_env, f"rule {rule.name} has no conda: directive"
        env = (REPO / "workflow" / "rules" / rule.conda_env).resolve()
        # GPU stages (gpu=1) get the GPU environment, the others the CPU one.
        gpu = rule.resources.get("gpu").value == 1
        assert env == ENVS["gpu" if gpu else "cpu"], rule.name
