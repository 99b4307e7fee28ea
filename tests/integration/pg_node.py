"""A throw-away PostgreSQL 15 server for the integration tests (the shared
dedupe store, tests/integration/test_dedupe_pg.py).

    pg = PgNode.for_class(cls)     # initdb + pg_ctl start; stopped and deleted by a class cleanup
    pg.url                         # postgresql://postgres@127.0.0.1:<port>/postgres
    pg.stop() / pg.start()         # `pg_ctl stop -m fast` / start again, same port and data
    pg.sql("SELECT ...")           # psql -At, returns its stdout
    pg.session(sql)                # a psql process running `sql` in the background (Popen)

It runs as the `postgres` user (initdb refuses root), from the Debian
postgresql-15 binaries (/usr/lib/postgresql/15/bin), with its data dir and
socket dir in a temp dir owned by postgres, listening on 127.0.0.1 on a free
port, trust authentication. An atexit hook stops every server this process
started.
"""
import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import List

from broker_node import free_port

PG_BIN = "/usr/lib/postgresql/15/bin"
PG_USER = "postgres"

_LIVE: List["PgNode"] = []


def available() -> bool:
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return False
    return os.access(os.path.join(PG_BIN, "pg_ctl"), os.X_OK) and shutil.which("psql") is not None


class PgNode:
    def __init__(self) -> None:
        self.port = free_port()
        self.base = tempfile.mkdtemp(prefix="er-pg-")
        pw = pwd.getpwnam(PG_USER)
        os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.data = os.path.join(self.base, "data")
        self.log = os.path.join(self.base, "server.log")
        self.url = "postgresql://postgres@127.0.0.1:%d/postgres" % self.port
        self._inited = False
        _LIVE.append(self)

    @classmethod
    def for_class(cls, test_class) -> "PgNode":
        node = cls()
        test_class.addClassCleanup(node.close)
        node.start()
        return node

    def _as_pg(self, argv, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", PG_USER, "--"] + argv, capture_output=True, text=True,
                              cwd=self.base, **kw)

    def start(self) -> None:
        if not self._inited:
            r = self._as_pg([os.path.join(PG_BIN, "initdb"), "-D", self.data, "-A", "trust", "-U", PG_USER,
                             "--no-sync"], timeout=120)
            if r.returncode != 0:
                raise RuntimeError("initdb failed: %s%s" % (r.stdout, r.stderr))
            self._inited = True
        opts = "-p %d -c listen_addresses=127.0.0.1 -c unix_socket_directories=%s -c fsync=off" % (self.port, self.base)
        r = self._as_pg([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-l", self.log, "-o", opts, "-w",
                         "-t", "60", "start"], timeout=90)
        if r.returncode != 0:
            raise RuntimeError("pg_ctl start failed: %s%s\n%s" % (r.stdout, r.stderr, self.tail()))

    def stop(self, mode: str = "fast") -> None:
        if not self.running():
            return
        self._as_pg([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "60", "stop"],
                    timeout=90)

    def running(self) -> bool:
        if not self._inited:
            return False
        r = self._as_pg([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "status"], timeout=30)
        return r.returncode == 0

    def sql(self, text: str) -> str:
        r = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-d", "postgres",
                            "-At", "-v", "ON_ERROR_STOP=1", "-c", text], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("psql failed: %s" % r.stderr)
        return r.stdout.strip()

    def session(self, text: str) -> subprocess.Popen:
        p = subprocess.Popen(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-d", "postgres",
                              "-At", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        p.stdin.write(text)
        p.stdin.flush()
        return p

    def tail(self, n: int = 30) -> str:
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            if self in _LIVE:
                _LIVE.remove(self)


@atexit.register
def _stop_all() -> None:
    for node in list(_LIVE):
        try:
            node.close()
        except Exception:
            pass
