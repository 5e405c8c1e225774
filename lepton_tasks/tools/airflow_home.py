"""The checkout as a working AIRFLOW_HOME: the environment Airflow commands run with, from any shell or cron.

`lepton run` (and `make`) use this instead of an activated virtualenv and a sourced secrets file: Airflow is the
one installed next to this interpreter, and the keys Airflow's components must share come from the checkout's
git-ignored `var/secrets.env`, generated once (mode 600). Variables already set in the environment win.

    python -m lepton_tasks.tools.airflow_home     # writes var/secrets.env if it is missing
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
from pathlib import Path

from lepton_tasks.config.settings import REPO_ROOT, Settings
from lepton_tasks.core.storage import write_private

SECRETS_FILE = REPO_ROOT / "var" / "secrets.env"
BIN = Path(sys.executable).parent
SECRET_NAMES = ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY")
QUIET = {"GX_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
         "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}


def ensure_secrets(path: Path = SECRETS_FILE) -> Path:
    """Write `export NAME=value` lines with fresh keys, once, readable by the owner only."""
    if not path.exists():
        write_private(path, "".join(f"export {name}={secrets.token_hex(32)}\n" for name in SECRET_NAMES))
    return path


def read_secrets(path: Path = SECRETS_FILE) -> dict[str, str]:
    """The `export NAME=value` lines of a secrets file."""
    values = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            values[name] = value
    return values


def airflow_command() -> str:
    """The `airflow` installed beside this interpreter (not whichever is first on PATH)."""
    return str(BIN / "airflow")


def checkout_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: this process's) completed with AIRFLOW_HOME, the shared keys and the quiet flags."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("AIRFLOW_HOME", str(REPO_ROOT))
    local = Settings.from_env().local_warehouse_env()
    for name, value in {**read_secrets(ensure_secrets()), **QUIET, **local}.items():
        env.setdefault(name, value)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])  # Dask and Airflow start their own helpers
    return env


if __name__ == "__main__":
    print(ensure_secrets())
