"""pyproject.toml and the pinned requirement files describe the same install sets (scripts/check_requirements.sh,
in CI, checks that each set resolves; this checks that the two lists have not drifted apart)."""

import pathlib
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools.discovery import PackageFinder

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _key(req: Requirement) -> tuple[str, str]:
    """A requirement's identity: its name and its environment marker (normalised by packaging)."""
    return canonicalize_name(req.name), str(req.marker or "")


def _read(name: str) -> tuple[list[str], dict[tuple[str, str], Requirement]]:
    """The files a requirements file includes with -r, and its own requirements by _key."""
    includes, reqs = [], {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            includes.append(line[3:].strip())
            continue
        assert not line.startswith("-"), f"{name}: unexpected option {line!r}"
        req = Requirement(line)
        assert _key(req) not in reqs, f"{name} lists {req.name} twice"
        reqs[_key(req)] = req
    return includes, reqs


def _project(reqs: list[str]) -> dict[tuple[str, str], Requirement]:
    parsed = [Requirement(r) for r in reqs]
    assert len({_key(r) for r in parsed}) == len(parsed), "pyproject.toml lists a requirement twice"
    return {_key(r): r for r in parsed}


def _pinned(req: Requirement) -> str | None:
    pins = [s.version for s in req.specifier if s.operator == "=="]
    return pins[0] if pins else None


def _assert_agree(pinned: dict, ranged: dict, what: str) -> None:
    """Same names, markers and extras; each exact pin lies in pyproject's range, each range is pyproject's."""
    only_file, only_project = sorted(set(pinned) - set(ranged)), sorted(set(ranged) - set(pinned))
    assert not only_file and not only_project, (
        f"{what} and pyproject.toml differ: only in {what}: {only_file}; only in pyproject.toml: {only_project}")
    for key, pin in pinned.items():
        other = ranged[key]
        assert pin.extras == other.extras, f"{what}: {pin.name}'s extras differ"
        version = _pinned(pin)
        if version is not None:
            assert other.specifier.contains(version, prereleases=True), (
                f"{what}: {pin.name}=={version} is outside pyproject.toml's {other.specifier}")
        else:
            assert pin.specifier == other.specifier, f"{what}: {pin.name}'s ranges differ"


def test_runtime_set_agrees_with_requirements_txt():
    includes, pinned = _read("requirements.txt")
    assert includes == []
    _assert_agree(pinned, _project(PROJECT["dependencies"]), "requirements.txt")
    names = {name for name, _ in pinned}
    assert "torch" not in names and "pytest" not in names, "the runtime set must not pull the test tools"
    for name, req in pinned.items():
        assert req.specifier, f"requirements.txt: {name} is not pinned"


def test_tensorflow_cpu_except_on_arm():
    _, pinned = _read("requirements.txt")
    by_name = {name: req for (name, _), req in pinned.items()}
    cpu, full = by_name["tensorflow-cpu"], by_name["tensorflow"]
    assert cpu.specifier == full.specifier
    for env, want in [({"sys_platform": "linux", "platform_machine": "x86_64"}, cpu),
                      ({"sys_platform": "linux", "platform_machine": "aarch64"}, full),
                      ({"sys_platform": "darwin", "platform_machine": "x86_64"}, cpu),
                      ({"sys_platform": "darwin", "platform_machine": "arm64"}, full)]:
        chosen = [r for r in (cpu, full) if r.marker.evaluate(env)]
        assert chosen == [want], env


def test_test_set_agrees_with_requirements_test_txt():
    includes, pinned = _read("requirements-test.txt")
    assert includes == ["requirements.txt"]
    _assert_agree(pinned, _project(PROJECT["optional-dependencies"]["test"]), "requirements-test.txt")
    torch = [req for (name, _), req in pinned.items() if name == "torch"]
    assert len(torch) == 1 and _pinned(torch[0]), "torch must stay pinned exactly (else a multi-GB CUDA build)"
    project_torch = _project(PROJECT["optional-dependencies"]["test"])[("torch", "")]
    assert _pinned(project_torch) == _pinned(torch[0])


@pytest.mark.parametrize("accelerator", ["cuda12", "tpu"])
def test_accelerator_sets_pin_jax_extra(accelerator):
    includes, pinned = _read(f"requirements-{accelerator}.txt")
    assert includes == ["requirements.txt"]
    for name, req in pinned.items():
        assert _pinned(req), f"requirements-{accelerator}.txt: {name} is not pinned exactly"
    _, runtime = _read("requirements.txt")
    jax_version = _pinned(runtime[("jax", "")])
    jax = pinned[("jax", "")]
    assert jax.extras == {accelerator} and _pinned(jax) == jax_version, f"want jax[{accelerator}]=={jax_version}"
    extra = _project(PROJECT["optional-dependencies"][accelerator])
    assert list(extra) == [("jax", "")] and extra[("jax", "")].extras == {accelerator}
    assert extra[("jax", "")].specifier.contains(jax_version)


def test_packages():
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    packages = set(PackageFinder.find(str(ROOT / find["where"][0]), include=find["include"]))
    assert {"atss_jax", "configs", "scripts"} <= packages
    subpackages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "atss_jax").rglob("__init__.py")}
    assert subpackages <= packages, f"not installed: {subpackages - packages}"
    assert not any(p == "tests" or p.startswith("tests.") for p in packages)


def test_python_version():
    from packaging.specifiers import SpecifierSet

    supported = SpecifierSet(PROJECT["requires-python"])
    assert "3.11" in supported and "3.13" in supported and "3.10" not in supported
