"""Env files as people have them (`conda env export`, with or without --from-history), built without conda;
env names; what a build may see of the executor's environment; built envs that tasks cannot change.

Real executor servers (tests/test_executor.py's Server), real uv builds from PyPI, real task processes.
The conda-export fixtures are tests/fixtures/envs/conda/*.yml.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))
import executor  # noqa: E402
from test_executor import READY_TIMEOUT, Server, clean_environ, collect, lines_of, wait_until  # noqa: E402

pb2 = executor.pb2
CONDA_EXPORTS = FIXTURES / "envs" / "conda"
# Exports from other projects' shapes (issue 19): each is either built (a few) or translated without a build.
OTHER_EXPORTS = FIXTURES / "envs" / "exports"
# What the gRPC env of a real `conda env export` lists: C/C++ libraries and runtimes besides Python packages.
GRPC_EXPORT = """\
name: grpc_test
channels:
  - defaults
dependencies:
  - _libgcc_mutex=0.1=main
  - _openmp_mutex=5.1=1_gnu
  - abseil-cpp=20211102.0=hd4dd3e8_0
  - c-ares=1.19.1=h5eee18b_0
  - ca-certificates=2024.3.11=h06a4308_0
  - grpc-cpp=1.48.2=he1ff14a_1
  - gtest=1.14.0=hdb19cb5_0
  - ld_impl_linux-64=2.38=h1181459_1
  - libffi=3.4.4=h6a678d5_0
  - libgcc-ng=11.2.0=h1234567_1
  - libprotobuf=3.20.3=he621ea3_0
  - libstdcxx-ng=11.2.0=h1234567_1
  - libuuid=1.41.5=h5eee18b_0
  - ncurses=6.4=h6a678d5_0
  - openssl=3.0.13=h7f8727e_0
  - python=3.10.14=h955ad1f_0
  - re2=2022.04.01=h295c915_2
  - readline=8.2=h5eee18b_0
  - setuptools=69.5.1=py310h06a4308_0
  - six=1.16.0=pyhd3eb1b0_1
  - sqlite=3.45.3=h5eee18b_0
  - tk=8.6.14=h39e8969_0
  - tzdata=2024a=h04d1e81_0
  - wheel=0.43.0=py310h06a4308_0
  - xz=5.4.6=h5eee18b_1
  - zlib=1.2.13=h5eee18b_1
  - pip:
      - grpcio==1.62.1
      - grpcio-tools==1.62.1
      - protobuf==4.25.3
prefix: /home/someone/miniconda3/envs/grpc_test
"""


def write_yml(folder: Path, file_name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    tasks = tmp_path_factory.mktemp("tasks") / "tasks"
    shutil.copytree(FIXTURES / "tasks", tasks)
    return tasks


@pytest.fixture
def servers():
    started: list[Server] = []

    def start(home: Path, envs_dir: Path, tasks: Path, **kwargs) -> Server:
        environ = kwargs.pop("environ", clean_environ())
        server = Server(home, envs_dir, tasks, "--backend", "venv", environ=environ, **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def versions(server: Server, env: str, *modules: str) -> dict[str, str]:
    events, status = collect(server.client(server.token or None).run(env, "envs/versions.py", args=modules))
    assert status.exit_code == 0, lines_of(events)
    return json.loads(lines_of(events, pb2.STDOUT)[-1])


def envs_cli(server: Server) -> str:
    env = clean_environ(VPE_EXECUTOR_PORT=str(server.port), VPE_EXECUTOR_TOKEN=server.token)
    result = subprocess.run([sys.executable, str(ROOT / "executor.py"), "envs"], capture_output=True, text=True,
                            env=env, timeout=60)
    return result.stdout + result.stderr


# ---------------------------------------------------------------- reading conda files (no builds)

@pytest.mark.parametrize("text, name, version, build, pip", [
    ("six", "six", "", "", ""),
    ("six=1.16", "six", "1.16", "", "==1.16.*"),
    ("six=1.16.0=pyhd3eb1b0_1", "six", "1.16.0", "pyhd3eb1b0_1", "==1.16.0"),
    ("six==1.16.0", "six", "==1.16.0", "", "==1.16.0"),
    ("six>=1.15,<2", "six", ">=1.15,<2", "", ">=1.15,<2"),
    ("conda-forge::six=1.16.*", "six", "1.16.*", "", "==1.16.*"),
    ("six 1.16.0 py_0", "six", "1.16.0", "py_0", "==1.16.0"),
    ("six[version='>=1.15,<2', build=py*]", "six", ">=1.15,<2", "py*", ">=1.15,<2"),
])
def test_conda_match_specs_in_all_their_forms(text, name, version, build, pip):
    dep = executor.parse_match_spec(text, Path("x.yml"))
    assert (dep.name, dep.version, dep.build) == (name, version, build)
    assert dep.pip_specifier(Path("x.yml")) == pip


def test_a_full_export_keeps_python_packages_and_skips_libraries_by_build_string(tmp_path):
    spec = executor.parse_env_yml(write_yml(tmp_path, "grpc.yml", GRPC_EXPORT))
    assert (spec.name, spec.python) == ("grpc_test", "3.10.14")
    translation = executor.translate(spec)
    assert translation.requirements == ["six==1.16.0", "grpcio==1.62.1", "grpcio-tools==1.62.1", "protobuf==4.25.3"]
    outcome = {executor.parse_match_spec(r.spec, Path()).name: (r.outcome, r.target) for r in translation.rows}
    # Unrelated projects of the same name exist on PyPI: these must never be installed by name.
    for library in ("re2", "gtest", "libuuid", "tzdata", "grpc-cpp", "abseil-cpp", "libprotobuf"):
        assert outcome[library][0] == executor.SKIPPED, library
    assert outcome["_openmp_mutex"] == (executor.SKIPPED, executor.METAPACKAGE_WHY)
    assert outcome["setuptools"][0] == executor.SKIPPED and not translation.seed_pip


def test_pip_from_conda_is_the_venvs_own_installer_not_a_broken_requirement(tmp_path):
    spec = executor.parse_env_yml(write_yml(tmp_path, "p.yml", "dependencies:\n  - python=3.11\n"
                                                              "  - pip=23.3.1=py312h06a4308_0\n"))
    translation = executor.translate(spec)
    assert translation.requirements == [] and translation.seed_pip


@pytest.mark.parametrize("line", ["python>=3.10", "python=3", "python 3.x"])
def test_a_python_line_that_names_no_version_is_refused_not_ignored(tmp_path, line):
    with pytest.raises(executor.EnvSpecError, match=r"python=X\.Y"):
        executor.parse_env_yml(write_yml(tmp_path, "p.yml", f"dependencies:\n  - {line}\n"))


@pytest.mark.parametrize("line, python", [("python=3.11.7=hab00c5b_0_cpython", "3.11.7"),
                                          ("python=3.11.5=h2755cc3_0", "3.11.5"), ("python=3.9.18=0_73_pypy", None)])
def test_a_python_build_string_names_cpython_or_pypy_which_is_refused(tmp_path, line, python):
    yml = write_yml(tmp_path, "p.yml", f"dependencies:\n  - {line}\n")
    if python:
        assert executor.parse_env_yml(yml).python == python
    else:
        with pytest.raises(executor.EnvSpecError, match="is PyPy"):
            executor.parse_env_yml(yml)


def test_the_build_key_includes_the_interpreter_actually_used(tmp_path):
    spec = executor.parse_env_yml(write_yml(tmp_path, "p.yml", "dependencies:\n  - python=3.12\n  - six\n"))
    translation = executor.translate(spec)
    one = executor.VenvPlan(executor.Interpreter("/a/python3.12", "3.12.1", "PATH"), translation)
    other = executor.VenvPlan(executor.Interpreter("/b/python3.12", "3.12.8", "pyenv"), translation)
    assert spec.digest("venv+uv", one) != spec.digest("venv+uv", other)


def test_dags_use_env_names_that_envs_declare():
    declared = {executor.declared_env_name(yml) for yml in (ROOT / "envs").glob("*.yml")}
    for dag in (ROOT / "dags").glob("*.py"):
        for call in ast.walk(ast.parse(dag.read_text())):
            env = next((k.value for k in getattr(call, "keywords", []) if k.arg == "env"), None)
            if isinstance(env, ast.Constant):
                assert env.value in declared, f"{dag.name} uses env {env.value!r}; envs/*.yml declare {declared}"


# ---------------------------------------------------------------- exports from other projects (no builds)

def translated(file_name: str) -> dict[str, tuple[str, str]]:
    """conda name -> (outcome, PyPI requirement or why) for a fixture in OTHER_EXPORTS."""
    translation = executor.translate(executor.parse_env_yml(OTHER_EXPORTS / file_name))
    return {r.name: (r.outcome, r.target) for r in translation.rows}


def settled(file_name: str) -> executor.VenvPlan:
    """The fixture's plan after asking the real index (metadata only: nothing is downloaded or installed)."""
    spec = executor.parse_env_yml(OTHER_EXPORTS / file_name)
    uv = executor.find_uv()
    assert uv, "the test venv has uv"
    return executor.settle_with_index(spec, executor.plan_venv(spec, uv), uv, lambda line: None)


def test_the_name_table_is_grayskulls_file_beside_the_executor():
    assert (executor.HERE / executor.NAMES_FILE).is_file()
    names = executor.grayskull_names()
    assert sum(len(entries) for entries in names.values()) == 141
    dep = executor.parse_match_spec
    for conda, pypi in [("pytorch=2.1.0=py3.11_cpu_0", "torch"), ("msgpack-python=1.0.3", "msgpack"),
                        ("matplotlib-base=3.8.0", "matplotlib"), ("pytables=3.8.0", "tables"), ("six=1.16.0", "six")]:
        parsed = dep(conda, Path())
        assert executor.pypi_name_of(parsed) == pypi, conda


@pytest.mark.parametrize("line, pypi", [
    ("pyqt=4.11.4", "pyqt4"),      # grayskull's version ranges pick among PyQt4 and PyQt5
    ("pyqt=5.15.7", "pyqt5"),
    ("pyqt", "pyqt5"),             # no version: the newest range
    ("opencv=4.6.0", "opencv-python"),  # three PyPI names: ours settles it
    ("brotli-python=1.0.9", "Brotli"),  # not in grayskull's table: ours
    ("py-opencv=4.6.0", "opencv-python"),
])
def test_where_several_pypi_names_or_none_map_to_a_conda_name_the_stated_rule_picks(line, pypi):
    parsed = executor.parse_match_spec(line, Path())
    assert executor.pypi_name_of(parsed) == pypi


def test_a_bioconda_env_is_refused_up_front_naming_its_programs_and_nothing_else():
    spec = executor.parse_env_yml(OTHER_EXPORTS / "bioconda.yml")
    with pytest.raises(executor.EnvSpecError) as info:
        executor.plan_venv(spec, executor.find_uv())
    message = str(info.value)
    assert "krona, muscle, perl are conda programs" in message and "micromamba" in message and "remove them" in message
    for other in ("plyvel", "leveldb", "libcurl", "biopython", "numpy", "curl="):
        assert other not in message, other


@pytest.mark.parametrize("line", [
    "perl=5.32.1=2_h7f98852_perl5", "perl-dbi=1.643=pl5321h166bdaf_0",       # perl and its modules
    "krona=2.8.1=pl5321hdfd78af_1", "muscle=3.8.31=0", "samtools",          # bioconda's tools, by name
    "r-base=4.3.1=h639d9d3_5", "r-ggplot2=3.4.4=r43hc72bb7e_0", "r-essentials",  # R and its packages
    "seqtk=1.4=r431h2bb3201_0",                                            # built against R
    "bioconda::vpe-unknown-tool=1.0=h4ac6f70_0",                            # a bioconda line that is not py*
])
def test_programs_are_known_by_name_build_or_channel(line):
    dep = executor.parse_match_spec(line, Path())
    assert executor.classify_conda_dep(dep, {dep.name}) == (executor.REFUSED, executor.PROGRAM_WHY)


@pytest.mark.parametrize("line", ["plyvel=1.5.1=py311hb755f60_0", "bioconda::pysam=0.22.0=py311h1234567_0",
                                  "rpy2=3.5.11=py311r43h1f0f07a_0", "leveldb=1.23=h6e8e06c_0"])
def test_python_packages_and_libraries_of_such_envs_are_not_programs(line):
    dep = executor.parse_match_spec(line, Path())
    assert executor.classify_conda_dep(dep, {dep.name})[1] != executor.PROGRAM_WHY


def test_a_windows_export_skips_runtimes_mkl_pywin32_and_keeps_its_python_packages():
    rows = translated("windows.yml")
    for name in ("vc", "vs2015_runtime", "ucrt", "mkl", "mkl-service", "mkl_fft", "tbb", "tk", "pywin32", "numpy-base"):
        assert rows[name][0] == executor.SKIPPED, name
    assert rows["pywin32"][1] == "Windows only"
    assert rows["tkinter"] == (executor.SKIPPED, "part of CPython (module _tkinter), which the interpreter has")
    assert rows["pandas"] == (executor.INSTALLED, "pandas==2.1.4") and rows["pytest"] == (executor.INSTALLED, "pytest==7.4.0")
    assert rows["pytz"] == (executor.INSTALLED, "pytz==2023.3.post1")
    spec = executor.parse_env_yml(OTHER_EXPORTS / "windows.yml")
    assert executor.translate(spec).stdlib_modules == {"_tkinter": "tkinter=8.6.12=py311h2755cc3_0"}


def test_a_full_linux_export_skips_every_library_and_metapackage():
    rows = translated("linux_full.yml")
    installed = {name: target for name, (outcome, target) in rows.items() if outcome == executor.INSTALLED}
    assert installed == {"backports.tarfile": "backports.tarfile==1.0.0", "brotli-python": "Brotli==1.1.0",
                         "certifi": "certifi==2023.11.17", "charset-normalizer": "charset-normalizer==3.3.2",
                         "idna": "idna==3.6", "pysocks": "pysocks==1.7.1", "requests": "requests==2.31.0",
                         "urllib3": "urllib3==2.1.0"}
    assert rows["backports"][0] == rows["python_abi"][0] == executor.SKIPPED
    spec = executor.parse_env_yml(OTHER_EXPORTS / "linux_full.yml")
    assert spec.python == "3.11.7", "a *_cpython build string names the interpreter as any other"


def test_noarch_and_renamed_packages_get_the_versions_pypi_has():
    plan = settled("noarch_renamed.yml")
    rows = {r.name: (r.outcome, r.target) for r in plan.translation.rows}
    assert rows["opencv"] == (executor.INSTALLED, "opencv-python==4.6.0.*"), "PyPI has only 4.6.0.66"
    assert rows["py-opencv"][0] == executor.SKIPPED, "the same PyPI package as opencv"
    assert rows["brotli-python"] == (executor.INSTALLED, "Brotli==1.0.9"), "PyPI has 1.0.9 itself"
    assert rows["ipython_genutils"] == (executor.INSTALLED, "ipython_genutils==0.2.0")
    assert rows["matplotlib"] == (executor.INSTALLED, "matplotlib==3.8.0")
    for name in ("backports", "python_abi", "matplotlib-base", "libopencv"):
        assert rows[name][0] == executor.SKIPPED, name
    assert plan.python.version.startswith("3.10.")


@pytest.mark.parametrize("lines, named, absent", [
    (["brotli-python=1.0.77=py311_0", "vpe-no-such-project-4242=1.0=py311_0", "six=1.16.0=pyhd3eb1b0_1"],
     ["brotli-python=1.0.77=py311_0", "vpe-no-such-project-4242=1.0=py311_0"], ["six"]),
    (["pandas=2.1.4=py311_0", "numpy=1.21.0=py311_0", "six=1.16.0=pyhd3eb1b0_1"],
     ["pandas=2.1.4=py311_0", "numpy=1.21.0=py311_0"], ["six"]),
])
def test_a_set_pypi_cannot_give_is_refused_naming_its_lines_before_anything_is_installed(tmp_path, lines, named,
                                                                                           absent):
    body = "".join(f"  - {line}\n" for line in lines)
    spec = executor.parse_env_yml(write_yml(tmp_path, "x.yml", f"name: x\ndependencies:\n  - python=3.11\n{body}"))
    uv = executor.find_uv()
    log: list[str] = []
    with pytest.raises(executor.EnvSpecError) as info:
        executor.settle_with_index(spec, executor.plan_venv(spec, uv), uv, log.append)
    message = str(info.value)
    assert all(line in message for line in named) and not any(name in message for name in absent), message
    assert "Because" not in message and "No solution" not in message, "the resolver's words stay in the log"
    assert any("No solution found" in line for line in log)


def test_the_seeds_env_files_resolve_as_they_are():
    uv = executor.find_uv()
    for yml in sorted((ROOT / "envs").glob("*.yml")):
        spec = executor.parse_env_yml(yml)
        plan = executor.settle_with_index(spec, executor.plan_venv(spec, uv), uv, lambda line: None)
        assert plan.translation.requirements == list(spec.pip_packages), yml.name


@pytest.fixture
def only_system_python(monkeypatch, tmp_path):
    """A machine whose only Python 3.11 is Debian's, built without Tk."""
    system = Path("/usr/bin/python3.11")
    if not system.exists() or subprocess.run([system, "-c", "import _tkinter"], capture_output=True).returncode == 0:
        pytest.skip("needs /usr/bin/python3.11 without _tkinter (Debian's, without python3-tk)")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "no-pyenv"))
    monkeypatch.setattr(sys, "_base_executable", str(system), raising=False)
    return system


def test_tkinter_without_a_python_that_has_it_is_refused_naming_it(only_system_python):
    spec = executor.parse_env_yml(OTHER_EXPORTS / "windows.yml")
    with pytest.raises(executor.EnvSpecError) as info:
        executor.plan_venv(spec, None)
    message = str(info.value)
    assert "tkinter=8.6.12=py311h2755cc3_0" in message and f"{only_system_python}: no _tkinter" in message
    assert "pandas" not in message


def test_tkinter_picks_the_python_that_has_it_over_one_found_first(only_system_python, monkeypatch, tmp_path):
    pyenv = Path.home() / ".pyenv"
    if not any((pyenv / "versions").glob("3.11.*")):
        pytest.skip("needs a pyenv Python 3.11")
    monkeypatch.setenv("PYENV_ROOT", str(pyenv))
    plain = write_yml(tmp_path, "plain.yml", "dependencies:\n  - python=3.11\n")
    with_tk = write_yml(tmp_path, "tk.yml", "dependencies:\n  - python=3.11\n  - tkinter=8.6.12=py311h2755cc3_0\n")
    assert executor.plan_venv(executor.parse_env_yml(plain), None).python.path == str(only_system_python)
    assert executor.plan_venv(executor.parse_env_yml(with_tk), None).python.path.startswith(str(pyenv / "versions"))


# ---------------------------------------------------------------- building them without conda

@pytest.fixture(scope="module")
def export_server(tmp_path_factory, tasks_dir):
    """Both conda-export fixtures, built by one venv-backend executor."""
    server = Server(tmp_path_factory.mktemp("home"), CONDA_EXPORTS, tasks_dir, "--backend", "venv")
    server.start()
    yield server
    server.stop()


def test_exports_are_known_by_their_name_or_file_name_and_build(export_server):
    envs = export_server.envs()
    assert {n: e.state for n, e in envs.items()} == {"landslide_export": pb2.ENV_READY, "from_history": pb2.ENV_READY}, \
        {n: e.detail + "\n" + e.log_tail for n, e in envs.items()}


def test_a_full_export_runs_its_pinned_versions_and_nothing_of_the_executors(export_server):
    found = versions(export_server, "landslide_export", "pandas", "numpy", "psycopg2", "pymysql", "openpyxl",
                     "grpc", "google.protobuf", "psycopg")
    assert found["python"] == "3.12"
    assert (found["pandas"], found["numpy"], found["pymysql"], found["openpyxl"]) == ("2.1.4", "1.26.4", "1.0.2", "3.0.10")
    assert found["psycopg2"].startswith("2.9.9")
    assert found["grpc"] == found["google.protobuf"] == found["psycopg"] == "missing"
    assert versions(export_server, "landslide_export", "pandas") == {k: found[k] for k in ("python", "prefix", "pandas")}, \
        "running a task wrote nothing into the sealed env, so the next run finds it unchanged"


def test_a_from_history_export_runs_its_pinned_versions(export_server):
    found = versions(export_server, "from_history", "pandas", "numpy", "six", "grpc")
    assert (found["python"], found["pandas"], found["numpy"], found["grpc"]) == ("3.10", "2.1.4", "1.26.4", "missing")
    assert found["six"] != "missing"


def test_envs_and_the_build_log_show_the_translation(export_server):
    text = envs_cli(export_server)
    block = re.search(r"^landslide_export\s+ready\b.*?(?=^\S|\Z)", text, re.M | re.S).group(0)
    assert "psycopg2-binary==2.9.9 (psycopg2)" in block and "pymysql==1.0.2" in block
    assert re.search(r"skipped, C/C\+\+ library.*abseil-cpp.*re2", block)
    assert "numpy-base" in block and "build log: " in block
    python = re.search(r"Python (3\.12\.\d+) from", block)
    assert python, block
    assert ("patch level differs" in block) == (python.group(1) != "3.12.2")
    log = Path(export_server.envs()["landslide_export"].log_path).read_text()
    assert re.search(r"^  openssl=3\.0\.13=h7f8727e_0\s+skipped system library", log, re.M)
    assert re.search(r"^  pandas=2\.1\.4=py312h526ad5a_0\s+installed as pandas==2\.1\.4$", log, re.M)
    assert f"Python {python.group(1)} from" in log


def test_other_projects_exports_build_with_their_versions_or_are_refused_before_building(servers, tmp_path,
                                                                                          tasks_dir):
    envs_dir, home = tmp_path / "envs", tmp_path / "home"
    envs_dir.mkdir()
    for name in ("windows.yml", "linux_full.yml", "bioconda.yml"):
        shutil.copy(OTHER_EXPORTS / name, envs_dir / name)
    server = servers(home, envs_dir, tasks_dir)
    envs = server.envs()
    assert {n: e.state for n, e in envs.items()} == {"win_analysis": pb2.ENV_READY, "fetcher": pb2.ENV_READY,
                                                     "phylo": pb2.ENV_FAILED}, \
        {n: e.detail + "\n" + e.log_tail for n, e in envs.items()}
    assert "krona, muscle, perl are conda programs" in envs["phylo"].detail
    assert not list((home / "envs").glob("phylo*")), "refused before anything was installed"

    win = versions(server, "win_analysis", "pandas", "numpy", "pytest", "six", "dateutil", "_tkinter", "win32api")
    assert (win["python"], win["pandas"], win["numpy"], win["pytest"], win["six"], win["dateutil"]) == \
        ("3.11", "2.1.4", "1.26.4", "7.4.0", "1.16.0", "2.8.2")
    assert win["_tkinter"] == "present" and win["win32api"] == "missing"
    fetcher = versions(server, "fetcher", "requests", "urllib3", "brotli", "socks", "idna", "backports.tarfile")
    assert (fetcher["requests"], fetcher["urllib3"], fetcher["brotli"], fetcher["socks"], fetcher["idna"]) == \
        ("2.31.0", "2.1.0", "1.1.0", "1.7.1", "3.6")
    assert fetcher["backports.tarfile"] == "present"
    text = envs_cli(server)
    assert "Brotli==1.1.0 (brotli-python)" in text and re.search(r"skipped, Windows only: pywin32", text)
    assert re.search(r"skipped, Windows C/C\+\+ runtime: ucrt, vc, vs2015_runtime", text)


def test_what_no_venv_can_have_fails_naming_exactly_it(servers, tmp_path, tasks_dir):
    envs_dir = tmp_path / "envs"
    write_yml(envs_dir, "cuda.yml", "name: cuda\ndependencies:\n  - python=3.11\n  - six=1.16.0=pyhd3eb1b0_1\n"
                                    "  - cudatoolkit=11.8.0=h6a678d5_0\n  - openssl=3.0.13=h7f8727e_0\n")
    write_yml(envs_dir, "unknown.yml", "name: unknown\ndependencies:\n  - python=3.11\n"
                                       "  - vpe-no-such-project-4242=1.0=py311_0\n  - six=1.16.0=pyhd3eb1b0_1\n")
    write_yml(envs_dir, "first.yml", "name: twin\ndependencies:\n  - python=3.11\n")
    write_yml(envs_dir, "second.yml", "name: twin\ndependencies:\n  - python=3.11\n")
    write_yml(envs_dir, "escape.yml", "name: ../../escape\ndependencies:\n  - python=3.11\n")
    server = servers(tmp_path / "home", envs_dir, tasks_dir)
    envs = server.envs()
    assert {n: e.state for n, e in envs.items()} == {"cuda": pb2.ENV_FAILED, "unknown": pb2.ENV_FAILED,
                                                     "twin": pb2.ENV_FAILED, "escape": pb2.ENV_FAILED}
    assert "'../../escape'" in envs["escape"].detail and "change name:" in envs["escape"].detail
    assert "cudatoolkit=11.8.0=h6a678d5_0" in envs["cuda"].detail
    assert "six" not in envs["cuda"].detail and "openssl" not in envs["cuda"].detail
    assert "vpe-no-such-project-4242=1.0=py311_0" in envs["unknown"].detail and "six" not in envs["unknown"].detail
    assert str(envs_dir / "first.yml") in envs["twin"].detail and str(envs_dir / "second.yml") in envs["twin"].detail
    with pytest.raises(grpc.RpcError) as info:
        list(server.client().run("twin", "t/noop.py"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_build_sees_no_token_dsn_or_secret_of_the_executor(servers, tmp_path, tasks_dir):
    probe, seen = tmp_path / "envprobe", tmp_path / "seen.json"
    probe.mkdir()
    (probe / "setup.py").write_text(
        f"import json, os\nfrom setuptools import setup\njson.dump(sorted(os.environ), open({str(seen)!r}, 'w'))\n"
        f"setup(name='envprobe', version='1.0', py_modules=[])\n")
    write_yml(tmp_path / "envs", "probe.yml", f"name: probe\ndependencies:\n  - python=3.11\n"
                                              f"  - pip:\n      - envprobe @ file://{probe}\n")
    environ = clean_environ(VPE_WAREHOUSE_DSN="postgresql://u:pw@h/db", SOME_API_SECRET="s3cret")
    server = servers(tmp_path / "home", tmp_path / "envs", tasks_dir, environ=environ, token="tok")
    assert server.envs()["probe"].state == pb2.ENV_READY, server.envs()["probe"].log_tail
    names = set(json.loads(seen.read_text()))
    assert {"PATH", "HOME"} <= names
    assert not names & {"VPE_EXECUTOR_TOKEN", "VPE_WAREHOUSE_DSN", "SOME_API_SECRET"}


# ---------------------------------------------------------------- built envs are sealed

SEALED_YML = "name: sealed\ndependencies:\n  - python=3.11\n  - six=1.16.0=pyhd3eb1b0_1\n"


def sealed_env(server: Server) -> pb2.EnvStatus:
    built = server.envs()["sealed"]
    assert built.state == pb2.ENV_READY, built.log_tail
    return built


def attempts(server: Server, kind: str) -> dict[str, str]:
    events, status = collect(server.client().run("sealed", "envs/tamper.py", args=[kind]))
    assert status.exit_code == 0, lines_of(events)
    return {a["attempt"]: a["result"] for a in map(json.loads, lines_of(events, pb2.STDOUT))}


def assert_env_untouched(server: Server, built: pb2.EnvStatus) -> None:
    """The next task runs the env as built: the same build (not a rebuild), six as pinned, no dropped code."""
    events, status = collect(server.client().run("sealed", "envs/versions.py", args=["six"]))
    assert status.exit_code == 0, lines_of(events)
    assert not [line for line in lines_of(events) if "RAN" in line], lines_of(events)
    assert json.loads(lines_of(events, pb2.STDOUT)[-1])["six"] == "1.16.0"
    assert sealed_env(server).detail == built.detail, "the env was not rebuilt: it never changed"


@pytest.fixture(scope="module")
def read_only_server(tmp_path_factory, tasks_dir):
    """An executor whose tasks must get read-only mounts (it refuses to start where it cannot make them)."""
    home = tmp_path_factory.mktemp("home")
    envs_dir = home.parent / f"{home.name}-envs"
    write_yml(envs_dir, "sealed.yml", SEALED_YML)
    server = Server(home, envs_dir, tasks_dir, "--backend", "venv", "--env-protection", "mount", environ=clean_environ())
    server.start()
    yield server
    server.stop()


def test_the_kernel_refuses_a_pth_dropped_into_the_env_and_no_later_task_runs_it(read_only_server):
    server = read_only_server
    built = sealed_env(server)
    prefix = (server.home / "envs" / "sealed").resolve()
    writable = [p for p in prefix.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o222]
    assert not writable, f"left writable: {writable[:3]}"
    assert "read-only in the tasks' own mount namespace" in server.client().ping().containment

    events, status = collect(server.client().run("sealed", "envs/drop_pth.py"))
    assert status.exit_code == 0 and lines_of(events)[0].startswith("refused: [Errno 30] Read-only file system")
    assert not list(prefix.rglob("vpe_dropped.pth"))
    assert_env_untouched(server, built)


@pytest.mark.parametrize("kind", ["write", "replace", "undo"])
def test_a_task_cannot_change_its_env_nor_undo_the_protection(read_only_server, kind):
    built = sealed_env(read_only_server)
    results = attempts(read_only_server, kind)
    assert results and all(r.startswith("refused: ") for r in results.values()), results
    assert_env_untouched(read_only_server, built)


def test_a_task_can_change_neither_its_cgroups_nor_the_kernels_settings(read_only_server):
    results = attempts(read_only_server, "system")
    refused = [r for r in results.values() if r.startswith("refused: [Errno 30] Read-only file system")]
    assert len(results) == len(refused) == 3, results


def test_tasks_still_write_their_workspace_home_and_temp_files(read_only_server):
    results = attempts(read_only_server, "own")
    assert results == {"workspace": "done", "HOME": "done", "temp dir": "done"}


def test_without_read_only_mounts_a_changed_env_is_refused_for_the_next_run_and_rebuilt(servers, tmp_path, tasks_dir):
    envs_dir, home = tmp_path / "envs", tmp_path / "home"
    write_yml(envs_dir, "sealed.yml", SEALED_YML)
    server = servers(home, envs_dir, tasks_dir, environ=clean_environ(VPE_EXECUTOR_ENV_PROTECTION="watch"))
    sealed_env(server)
    assert "envs watched" in server.client().ping().containment

    events, status = collect(server.client().run("sealed", "envs/drop_pth.py"))
    assert status.exit_code == 0 and lines_of(events)[0].startswith("wrote"), "tasks run as root here: the write works"
    with pytest.raises(grpc.RpcError) as info:
        list(server.client().run("sealed", "t/noop.py"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "vpe_dropped.pth" in info.value.details()
    assert wait_until(lambda: server.envs()["sealed"].state == pb2.ENV_READY, READY_TIMEOUT, 0.2), server.log()
    events, status = collect(server.client().run("sealed", "envs/versions.py", args=["six"]))
    assert status.exit_code == 0 and "DROPPED PTH RAN" not in lines_of(events)
    assert json.loads(lines_of(events)[-1])["six"] == "1.16.0"

    # Replacing a file (rename over it) and a change in place after a chmod are seen as well.
    results = attempts(server, "replace")
    assert results["rename a file over six.py"] == "done", results
    with pytest.raises(grpc.RpcError) as info:
        list(server.client().run("sealed", "t/noop.py"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "six.py" in info.value.details()
    assert wait_until(lambda: server.envs()["sealed"].state == pb2.ENV_READY, READY_TIMEOUT, 0.2), server.log()
    assert attempts(server, "undo")["chmod six.py"] == "done"
    with pytest.raises(grpc.RpcError) as info:
        list(server.client().run("sealed", "t/noop.py"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "six.py" in info.value.details()
    assert wait_until(lambda: server.envs()["sealed"].state == pb2.ENV_READY, READY_TIMEOUT, 0.2), server.log()
    server.stop()

    # A change made while no executor watched: the restart notices it against the build's manifest.
    site_packages = next((home / "envs" / "sealed").resolve().glob("lib/python3.11/site-packages"))
    site_packages.chmod(0o755)
    (site_packages / "vpe_dropped.pth").write_text("import sys; sys.stderr.write('DROPPED PTH RAN\\n')\n")
    restarted = servers(home, envs_dir, tasks_dir)
    rebuilt = restarted.envs()["sealed"]
    assert rebuilt.state == pb2.ENV_READY and "cached" not in rebuilt.detail, rebuilt.detail
    events, status = collect(restarted.client().run("sealed", "t/noop.py"))
    assert status.exit_code == 0 and "DROPPED PTH RAN" not in lines_of(events)
