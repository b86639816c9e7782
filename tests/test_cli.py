"""The ``facedis`` command, the source checkout's entry scripts, shipped presets, the unified override
syntax, missing extras, and (slow) a real non-editable install run from an empty directory."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

import facedis
from facedis import cli
from facedis.config import (PRESETS_DIR, Config, ConfigError, describe_fields, list_presets, load_config,
                            resolve_preset, split_cli_overrides)

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"data_prep/prepare.py": "prepare", "sweeps/tune.py": "tune", "launch/submit.py": "submit",
           "launch/status.py": "status", "launch/aggregate.py": "aggregate"}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    """``facedis *argv`` in this process -> (exit status, stdout, stderr)."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return rc, out, err


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


# --------------------------------------------------------------------------------------------
# the command


def test_version_is_the_package_metadata(capsys):
    rc, out, _ = _cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"facedis {version('facedis')}"
    assert facedis.__version__ == version("facedis")


def test_help_names_every_command(capsys):
    rc, out, _ = _cli(capsys, "--help")
    assert rc == 0
    for name in ("train", "prepare", "tune", "submit", "status", "aggregate", "apps"):
        assert re.search(rf"^\s+{name}\s", out, re.M), name
    rc, _, err = _cli(capsys, "nope")
    assert rc == 2 and "invalid choice" in err
    rc, _, err = _cli(capsys)
    assert rc == 2 and "usage: facedis" in err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(capsys, name):
    rc, out, _ = _cli(capsys, name, "--help")
    assert rc == 0 and "usage:" in out
    if name != "apps":  # facedis.apps names itself `python -m facedis.apps`
        assert f"usage: facedis {name}" in out


def test_commands_run_the_modules_the_scripts_run():
    """``facedis X`` and the checkout's script are one code path: the script calls ``run_command``."""
    for script, name in SCRIPTS.items():
        tree = ast.parse((REPO / script).read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run_command"]
        assert len(calls) == 1 and calls[0].args[0].value == name, script
    assert cli.COMMANDS["train"][0] == "facedis.train" and cli.COMMANDS["apps"][0] == "facedis.apps.__main__"


def test_train_help_lists_every_config_field(capsys):
    rc, out, _ = _cli(capsys, "train", "--help")
    assert rc == 0
    assert re.search(r"^\s+train\.epochs\s+int = 300$", out, re.M)
    assert re.search(r"^\s+loss\.adv_id\s+float = 0\.001$", out, re.M)
    assert re.search(r"^\s+train\.precision\s+\{auto,no,bf16,fp16\} = auto$", out, re.M)

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type) and dataclasses.is_dataclass(
                    f.default_factory):
                yield from keys(f.default_factory, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    every = list(keys(Config))
    assert [d["key"] for d in describe_fields()] == every
    for key in every:
        assert re.search(rf"^\s+{re.escape(key)}\s", out, re.M), key


def test_every_config_field_has_a_docstring():
    """The help text comes from the attribute docstrings in facedis/config.py: each field needs one."""
    missing = [d["key"] for d in describe_fields() if not d["doc"]]
    assert not missing, f"add a docstring under these fields in facedis/config.py: {missing}"
    d = {x["key"]: x for x in describe_fields()}
    assert d["train.batch_size"]["doc"].startswith("Global batch size")  # from the docstring, first sentence
    assert d["loss.adv_id"]["doc"].startswith("λ3")


# --------------------------------------------------------------------------------------------
# presets


def test_presets_ship_in_the_package_with_one_copy():
    assert PRESETS_DIR == Path(facedis.__file__).resolve().parent / "configs"
    names = list_presets()
    assert {"synth", "coma", "bu3dfe", "facescape", "rows/coma-negt-iddis", "modes/ne-gt"} <= set(names)
    assert len([n for n in names if n.startswith("rows/")]) == 12
    link = REPO / "configs"  # the documented `--config configs/x.yaml` from the repository root
    assert link.is_symlink() and link.resolve() == PRESETS_DIR
    # every preset is package data (pyproject globs), so a non-editable install has it
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["facedis"]
    for p in PRESETS_DIR.rglob("*"):
        if p.is_file():
            rel = p.relative_to(PRESETS_DIR.parent)
            assert any(rel.match(g) and len(rel.parts) == len(Path(g).parts) for g in globs), rel


def test_resolve_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("synth", "synth.yaml", "configs/synth.yaml", "./configs/synth.yaml"):
        assert resolve_preset(name) == PRESETS_DIR / "synth.yaml"
    assert resolve_preset("rows/coma-negt-iddis") == PRESETS_DIR / "rows" / "coma-negt-iddis.yaml"
    cfg = load_config("configs/rows/coma-nonegt-iddis.yaml")  # base: chain inside the package
    assert cfg.dataset == "coma" and not cfg.method.neutral_gt and cfg.method.id_discriminator
    mine = tmp_path / "synth.yaml"  # a file that exists wins over a preset of the same name
    mine.write_text(f"base: {PRESETS_DIR / 'synth.yaml'}\ntrain:\n  epochs: 1\n")
    assert resolve_preset("synth.yaml") == Path("synth.yaml")
    assert load_config("synth.yaml").train.epochs == 1
    with pytest.raises(ConfigError, match="presets: .*rows/coma-negt-iddis"):
        resolve_preset("nope")
    with pytest.raises(ConfigError):
        resolve_preset("../facedis/config.py")  # names never leave the presets folder


def test_train_print_config_from_any_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _cli(capsys, "train", "--config", "synth", "--print-config")
    assert rc == 0
    cfg = yaml.safe_load(out)
    assert cfg["dataset"] == "synth" and cfg["data"]["root"] == "data/synth"
    rc, _, err = _cli(capsys, "train", "--config", "nope", "--print-config")
    assert rc == 2 and "presets:" in err and "synth" in err


# --------------------------------------------------------------------------------------------
# one override syntax


def test_split_cli_overrides():
    assert split_cli_overrides(["--a.b=1", "--c.d", "2", "e.f=3"]) == ["a.b=1", "c.d=2", "e.f=3"]
    with pytest.raises(ConfigError, match="--section.key=value"):
        split_cli_overrides(["--nonsense"])


def test_train_overrides(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for words in (["--train.epochs=3"], ["--train.epochs", "3"], ["--set", "train.epochs=3"]):
        rc, out, _ = _cli(capsys, "train", "--config", "synth", "--print-config", *words)
        assert rc == 0 and yaml.safe_load(out)["train"]["epochs"] == 3, words
    rc, _, err = _cli(capsys, "train", "--config", "synth", "--print-config", "--train.nope=1")
    assert rc == 2 and "train.nope" in err


def test_tune_overrides_and_resume_without_a_directory(tmp_path, monkeypatch):
    from facedis.sweeps import tune

    monkeypatch.chdir(tmp_path)
    args = tune.parse_args(["--dataset", "synth", "--train.epochs=3", "--set", "loss.recon=5", "--out", "o"])
    assert args.set_ == ["loss.recon=5", "train.epochs=3"]
    _, state = tune._new_state(args)
    assert state["base"]["train"]["epochs"] == 3 and state["base"]["loss"]["recon"] == 5
    assert "loss.recon" not in state["space"]  # a fixed key is not searched
    assert Path(state["config"]) == (PRESETS_DIR / "synth.yaml").resolve()
    with pytest.raises(SystemExit) as e:
        tune.parse_args(["--dataset", "synth", "--nonsense"])
    assert e.value.code == 2

    # the README's `--dataset coma --resume`: the newest coma sweep under sweeps/results/
    args = tune.parse_args(["--dataset", "coma", "--resume"])
    assert args.resume is tune.LATEST
    with pytest.raises(SystemExit, match="no coma sweep"):
        tune._resume_dir(args)
    for name in ("coma-20260101-120000", "coma-20260102-090000", "coma-smoke-20260103-000000", "synth-20260104-000000"):
        (tmp_path / "sweeps" / "results" / name).mkdir(parents=True)
        (tmp_path / "sweeps" / "results" / name / "sweep.json").write_text("{}")
    assert tune._resume_dir(args) == Path("sweeps/results/coma-20260102-090000")
    assert tune._resume_dir(tune.parse_args(["--resume", "x/y"])) == Path("x/y")
    assert tune._resume_dir(tune.parse_args(["--resume", "--out", "z"])) == Path("z")


def test_submit_overrides(capsys, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.chdir(tmp_path)
    rc, out, err = _cli(capsys, "submit", "--config", "synth", "--seeds", "0", "--cluster", "local",
                        "--gpus-per-node", "0", "--dry-run", "--runs-root", str(tmp_path / "runs"),
                        "--train.epochs=3", "--set", "loss.recon=5")
    assert rc == 0, err
    would = [line for line in out.splitlines() if line.startswith("would")]
    assert len(would) == 1 and str((PRESETS_DIR / "synth.yaml").resolve()) in would[0]
    assert "'loss.recon': 5" in would[0] and "'train.epochs': 3" in would[0]
    rc, _, err = _cli(capsys, "submit", "--config", "synth", "--cluster", "local", "--dry-run", "--train.nope=1")
    assert rc == 2 and "train.nope" in err


# --------------------------------------------------------------------------------------------
# missing extras


def test_missing_ray_names_the_sweep_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if Ray were not installed
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    rc, out, err = _cli(capsys, "tune", "--dataset", "synth", "--smoke-test")
    assert rc == 1
    assert "pip install 'facedis[sweep]'" in err and "Ray Tune" in err
    assert not (tmp_path / "sweeps").exists()  # nothing was started


def test_missing_submitit_names_the_cluster_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "submitit", None)
    for m in ("facedis.cluster.submit", "facedis.cluster.job", "facedis.cluster.status"):
        monkeypatch.delitem(sys.modules, m, raising=False)  # import them again, without submitit
    for argv in (["submit", "--config", "synth", "--dry-run"], ["status", str(tmp_path)]):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 1 and "pip install 'facedis[cluster]'" in err, argv
    rc, _, _ = _cli(capsys, "aggregate", "--help")  # needs no extra
    assert rc == 0


def test_entry_script_without_its_extra(tmp_path):
    """``python launch/submit.py`` without submitit: the same one-line error, exit status 1."""
    code = ("import runpy, sys; sys.modules['submitit'] = None; "
            f"sys.argv = [{str(REPO / 'launch' / 'submit.py')!r}, '--config', 'synth', '--dry-run']; "
            f"runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("python launch/submit.py: facedis submit/status needs submitit")


# --------------------------------------------------------------------------------------------
# the documented commands agree with the code

DOCS = ("README.md", "docs/training.md", "docs/sweeps.md", "docs/cluster.md", "docs/datasets.md", "docs/data-format.md",
        "docs/applications.md")


def _documented_commands(path: Path):
    """``(line, sub-command, argv)`` of every facedis command in the code blocks of ``path`` (written as
    ``facedis X``, a checkout script, ``python -m facedis...`` or ``accelerate launch ...``), bar
    lines with placeholders (``...``, ``<x>``, ``[opt]``, ``{a,b}``)."""
    import shlex

    blocks, lang, lines = [], None, []
    for raw in path.read_text().splitlines():
        if raw.startswith("```"):
            if lang is None:
                lang, lines = raw[3:].strip(), []
            else:
                if lang in ("", "bash", "sh"):
                    blocks.append("\n".join(lines))
                lang = None
        elif lang is not None:
            lines.append(raw)
    # and the data set table's commands (inline code)
    blocks.append("\n".join(re.findall(r"`(python data_prep/prepare\.py [^`]*)`", path.read_text())))
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"(?:^|\s+)#", line)[0].strip()
            for part in re.split(r"&&|;", line):
                if not part.strip() or any(c in part for c in ("…", "...", "<", "[", "{", "$")):
                    continue
                words = shlex.split(part)
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    words.pop(0)
                if not words:
                    continue
                exe, rest = words[0], words[1:]
                if exe == "facedis" or exe.endswith("/facedis"):
                    yield line, rest[0], rest[1:]
                elif re.fullmatch(r"(.*/)?python3?", exe) and rest:
                    if rest[:2] == ["-m", "facedis.apps"]:
                        yield line, "apps", rest[2:]
                    elif rest[:2] == ["-m", "facedis"]:
                        yield line, rest[2], rest[3:]
                    elif rest[0] in SCRIPTS:
                        yield line, SCRIPTS[rest[0]], rest[1:]
                    elif rest[0] == "facedis/train.py":
                        yield line, "train", rest[1:]
                elif exe.endswith("accelerate") and rest[:1] == ["launch"]:
                    if "facedis/train.py" in rest:
                        yield line, "train", rest[rest.index("facedis/train.py") + 1:]
                    elif "-m" in rest and rest[rest.index("-m") + 1] == "facedis":
                        i = rest.index("-m")
                        yield line, rest[i + 2], rest[i + 3:]


def _check_documented(command: str, argv: list[str]) -> None:
    """Parse ``argv`` as ``command`` does, and load/validate what it names, without running it."""
    if command == "train":
        train = importlib.import_module("facedis.train")  # (the attribute facedis.train is the function)

        args, rest = train.build_parser().parse_known_args(argv)
        overrides = train.split_overrides(args.set_) + train.split_overrides(rest)
        if args.config:
            load_config(args.config, overrides=overrides)
    elif command == "prepare":
        from facedis.prep import prepare

        first = next((a for a in argv if not a.startswith("-")), None)
        prepare.build_parser(first if first in prepare.SOURCES else None).parse_args(argv)
    elif command == "tune":
        from facedis.sweeps import tune

        args = tune.parse_args(argv)
        if not args.resume:
            tune._new_state(args, argv)
    elif command == "submit":
        from facedis.cluster import submit

        _, args = submit.parse_args(argv)
        if args.sweep:  # a Ray Tune sweep job: its own checks, the tune options by tune's parser
            submit.validate_sweep_args(args)
            return
        if args.grid and args.grid.startswith("sweep:"):
            d = Path(args.grid[len("sweep:"):])
            d.mkdir(parents=True, exist_ok=True)
            (d / "best1-a.yaml").touch()
        submit.validate_args(args)
    elif command in ("status", "aggregate"):
        module = importlib.import_module(cli.COMMANDS[command][0])
        assert module.main(argv) == 2  # parsed; stopped at the missing grid directory
    elif command == "apps":
        from facedis.apps.__main__ import build_parser

        build_parser().parse_args(argv)
    else:
        raise AssertionError(f"unknown command {command!r}")


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_parse(doc, tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    monkeypatch.chdir(tmp_path)
    checked = []
    for line, command, argv in _documented_commands(REPO / doc):
        assert command in cli.COMMANDS, line
        try:
            _check_documented(command, argv)
        except SystemExit as e:
            if e.code == 0:  # --help
                continue
            raise AssertionError(f"{doc}: `{line}` does not parse ({e}): {capsys.readouterr().err}") from None
        except ConfigError as e:
            raise AssertionError(f"{doc}: `{line}`: {e}") from None
        checked.append(command)
    assert checked, f"{doc}: no command found"
    if doc == "README.md":
        assert set(cli.COMMANDS) <= set(checked)


# --------------------------------------------------------------------------------------------
# the source checkout's entry scripts


def test_entry_scripts_are_thin_and_edit_no_path():
    for script in SCRIPTS:
        text = (REPO / script).read_text()
        assert "sys.path" not in text, script
        imports = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert {getattr(n, "module", None) or n.names[0].name for n in imports} == {"sys", "facedis.cli"}, script
    for folder in ("data_prep", "sweeps", "launch"):
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/ is not a package any more"
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include == ["facedis*"]
    for p in (REPO / "facedis").rglob("*.py"):  # library code finds itself through the installed package
        assert "sys.path.insert" not in p.read_text(), p


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_entry_scripts_run_from_another_directory(script, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert f"usage: python {script}" in r.stdout


def test_prepare_and_check_through_the_command(capsys, tmp_path):
    out = tmp_path / "tiny"
    rc, text, err = _cli(capsys, "prepare", "synth", "--out", str(out), "--subjects", "4", "--per-subject", "2",
                         "--vertices", "100", "--test-fraction", "0.5")
    assert rc == 0, err
    assert "prepared synth" in text and (out / "meta.json").is_file()
    rc, text, _ = _cli(capsys, "prepare", "check", str(out), "--json")
    assert rc == 0 and json.loads(text)["dataset"] == "synth"
    rc, _, err = _cli(capsys, "prepare", "check", str(tmp_path / "missing"))
    assert rc == 1 and "check FAILED" in err


# --------------------------------------------------------------------------------------------
# a real, non-editable install


@pytest.mark.slow
def test_non_editable_install_works_from_an_empty_directory(tmp_path):
    """``pip install .`` (not editable) into a fresh venv: the console script, the shipped presets and
    the field help work from an empty directory, and nothing but ``facedis`` is importable.

    The venv reuses this environment's dependencies through a ``.pth`` line naming its
    site-packages (a path line, not processed as a site dir: the editable install's finder there is
    not loaded), and the install is ``--no-deps --no-build-isolation`` from a copy of the tree."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "facedis", src / "facedis", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_deps_of_the_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**_env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    empty = tmp_path / "empty"
    empty.mkdir()

    def run(*cmd):
        return subprocess.run([str(c) for c in cmd], cwd=empty, capture_output=True, text=True, env=env, timeout=300)

    r = run(py, "-c", "import facedis; print(facedis.__file__)")
    assert r.returncode == 0 and Path(r.stdout.strip()).is_relative_to(purelib), r.stdout + r.stderr
    facedis_cmd = venv / "bin" / "facedis"
    r = run(facedis_cmd, "--help")
    assert r.returncode == 0 and "train" in r.stdout, r.stderr
    r = run(facedis_cmd, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"facedis {version('facedis')}"
    r = run(facedis_cmd, "train", "--config", "synth", "--print-config")
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["dataset"] == "synth", r.stderr
    r = run(facedis_cmd, "train", "--config", "rows/coma-nonegt-iddis", "--print-config")
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["method"]["neutral_gt"] is False, r.stderr
    r = run(facedis_cmd, "train", "--help")
    assert r.returncode == 0
    assert re.search(r"^\s+train\.epochs\s+int = 300$", r.stdout, re.M)
    assert re.search(r"^\s+loss\.adv_id\s+float = 0\.001$", r.stdout, re.M)
    r = run(py, "-c", "import facedis.prep.facescape as f; print(f.DEFAULT_OUTLIERS.is_file())")
    assert r.stdout.strip() == "True", r.stderr
    # the shipped demo model and its sample faces are package data: figures right after install
    r = run(facedis_cmd, "apps", "figures", "--model", "synth-demo", "--out", "figs", "--max-samples", "8")
    assert r.returncode == 0, r.stderr
    assert (empty / "figs" / "disentangle_best_median_worst.png").is_file()
    r = run(py, "-c", "import facedis; print(facedis.load('synth-demo').num_vertices)")
    assert r.stdout.strip() == "300", r.stderr
    for name in ("launch", "sweeps", "data_prep"):
        r = run(py, "-c", f"import {name}")
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, name
    assert not list(Path(purelib).glob("__editable__*"))
