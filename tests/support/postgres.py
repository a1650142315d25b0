"""A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries, a new cluster in
a temporary directory, listening on 127.0.0.1 only, stopped by its PID at the end.

PostgreSQL refuses to run as root; as root, the cluster belongs to the `postgres` user the
Debian package creates, and every server command runs as that user through `runuser`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"


def postgres_bin_dir() -> Path | None:
    """Where pg_ctl and initdb are: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    if pg_ctl := shutil.which("pg_ctl"):
        return Path(pg_ctl).resolve().parent
    installed = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(re.sub(r"\D", "", p.parent.parent.name) or 0),
    )
    return installed[-1].parent if installed else None


@dataclass(frozen=True)
class PostgresServer:
    bin_dir: Path
    port: int
    password: str
    host: str = "127.0.0.1"

    def client_env(self) -> dict[str, str]:
        """libpq's variables for psql and the like, connecting as the superuser."""
        return {
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": SUPERUSER,
            "PGPASSWORD": self.password,
            "PGDATABASE": "postgres",
        }


@contextmanager
def running_postgres(port: int, password: str) -> Iterator[PostgresServer]:
    """A new cluster on 127.0.0.1:`port` with password login for the superuser."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    as_owner = ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []

    # Not under pytest's tmp_path: its parents are private to root, and the server user
    # must reach the data directory.
    root = Path(tempfile.mkdtemp(prefix="gptflow-postgres-"))
    data, log, password_file = root / "data", root / "server.log", root / "password"
    password_file.write_text(password)
    if as_owner:
        shutil.chown(root, SUPERUSER)
        shutil.chown(password_file, SUPERUSER)

    def run(*command: str) -> None:
        subprocess.run([*as_owner, str(bin_dir / command[0]), *command[1:]], check=True, capture_output=True, text=True)

    try:
        run(
            "initdb",
            "--pgdata",
            str(data),
            "--username",
            SUPERUSER,
            "--pwfile",
            str(password_file),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--no-locale",
        )
        server_options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        run("pg_ctl", "start", "--pgdata", str(data), "--log", str(log), "--wait", "--options", server_options)
        pid = int((data / "postmaster.pid").read_text().split()[0])
        try:
            yield PostgresServer(bin_dir, port, password)
        finally:
            # pg_ctl signals the PID in postmaster.pid and waits until the server is gone.
            stopped = subprocess.run(
                [*as_owner, str(bin_dir / "pg_ctl"), "stop", "--pgdata", str(data), "--mode", "fast", "--wait"]
            )
            if stopped.returncode != 0:
                os.kill(pid, signal.SIGKILL)
    except subprocess.CalledProcessError as e:
        server_log = log.read_text() if log.exists() else ""
        raise RuntimeError(f"{' '.join(e.cmd)} failed:\n{e.stdout}{e.stderr}{server_log}") from None
    finally:
        shutil.rmtree(root, ignore_errors=True)
