"""A second, throw-away RabbitMQ node for the integration tests.

The shared broker (rabbit@<host>, 127.0.0.1:5672) must never be stopped by a
test. Tests that need a broker that goes away and comes back, or a TLS
listener, start their own node beside it with `BrokerNode`:

    node = BrokerNode()                 # picks free ports, makes a temp base dir
    node.start()                        # ~5-10 s; polls `rabbitmqctl await_startup`
    node.url                            # amqp://guest:guest@127.0.0.1:<port>/
    node.stop()                         # `rabbitmqctl -n NODE stop`, waits for exit
    node.start()                        # again: same name, ports and data dir
    node.kill()                         # SIGKILL (a crash); start() works after it too
    node.close()                        # stops it and deletes its base dir

or as a context manager (`with BrokerNode() as node:` starts and closes it),
or once per test class:

    @classmethod
    def setUpClass(cls):
        cls.node = BrokerNode.for_class(cls)    # started; closed by a class cleanup

How it runs. Only root (or the rabbitmq user itself) can do this: the node runs
as the `rabbitmq` user, via `runuser -u rabbitmq -- env -i ...
/usr/lib/rabbitmq/bin/rabbitmq-server` in the foreground (our own child, in its
own session, so it can always be killed), with a clean environment:

  RABBITMQ_NODENAME        er-test-<pid>-<hex>@localhost
  RABBITMQ_NODE_PORT       a free port (plain AMQP; kept across restarts)
  RABBITMQ_DIST_PORT       a free port (Erlang distribution)
  RABBITMQ_MNESIA_BASE     <base>/mnesia   (base: a temp dir owned by rabbitmq)
  RABBITMQ_LOG_BASE        <base>/log
  RABBITMQ_CONFIG_FILE     <base>/rabbitmq.conf (always ours: tcp listener, and
                           the TLS listener with `tls=TlsOptions(...)`)
  RABBITMQ_ADVANCED_CONFIG_FILE  <base>/advanced.config (empty list; or the
                           Erlang term `advanced_config="[{rabbit, [...]}]"`)
  RABBITMQ_ENABLED_PLUGINS_FILE  <base>/enabled_plugins ("[]."): no
                           management plugin, no port clashes, fast boot
                           (`management=True`: "[rabbitmq_management]." with
                           `management.tcp.port` a free port on 127.0.0.1;
                           `node.management_url()`, `node.add_user(name,
                           password, tags)` for a user tagged for it)
  HOME=/var/lib/rabbitmq   so the node and its CLI calls share the rabbitmq
                           user's Erlang cookie (/var/lib/rabbitmq/.erlang.cookie),
                           exactly like /usr/sbin/rabbitmqctl, which `su`s to
                           rabbitmq when run as root (root has no cookie here).

`node.ctl(*args)` runs rabbitmqctl against this node the same way (as
rabbitmq, `-n NODE`); `node.ctl(*args, tool="rabbitmq-upgrade")` another
CLI tool (rabbitmq-upgrade, rabbitmq-queues, rabbitmq-diagnostics). The node's own log is in `node.log_dir`; `node.tail()`
returns the start-up output, and is part of every start error.

A leftover node is impossible to miss: an atexit hook stops every node this
process started, and each node is our child process.

TLS: `TlsOptions(cacertfile, certfile, keyfile, verify_peer, fail_if_no_peer_cert)`
writes `listeners.ssl.default = <tls_port>` and the `ssl_options.*` keys; the
files must be readable by the rabbitmq user (see `make_test_pki`, which makes a
CA, a server certificate for localhost/127.0.0.1 and a client certificate with
`openssl`). `node.amqps_url()` is the TLS URL (host `localhost`, so hostname
verification against the certificate's SAN works). The plain listener stays on
`node.port`, handy for publishing test events.
"""
import atexit
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
from dataclasses import dataclass
from typing import Dict, List, Optional

RABBITMQ_BIN = "/usr/lib/rabbitmq/bin"
RABBITMQ_USER = "rabbitmq"
RABBITMQ_HOME = "/var/lib/rabbitmq"

_LIVE: List["BrokerNode"] = []


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable_reason() -> Optional[str]:
    """Why a second node cannot be started here (None if it can)."""
    if not os.path.exists(os.path.join(RABBITMQ_BIN, "rabbitmq-server")):
        return "rabbitmq-server is not installed (%s)" % RABBITMQ_BIN
    try:
        pwd.getpwnam(RABBITMQ_USER)
    except KeyError:
        return "no '%s' user" % RABBITMQ_USER
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != RABBITMQ_USER:
        return "starting a second RabbitMQ node needs root or the rabbitmq user"
    if not os.path.exists(os.path.join(RABBITMQ_HOME, ".erlang.cookie")):
        return "no Erlang cookie in %s" % RABBITMQ_HOME
    return None


def _as_rabbitmq(argv: List[str], env: Dict[str, str]) -> List[str]:
    """argv run as the rabbitmq user with exactly `env` (env -i)."""
    inner = ["env", "-i"] + ["%s=%s" % kv for kv in sorted(env.items())] + argv
    if os.geteuid() == 0:
        return ["runuser", "-u", RABBITMQ_USER, "--"] + inner
    return inner


def _chown_rabbitmq(path: str) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(RABBITMQ_USER)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for n in files:
            os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid)


@dataclass
class TlsOptions:
    """The node's TLS listener (`listeners.ssl.default` + `ssl_options.*`)."""
    cacertfile: str
    certfile: str
    keyfile: str
    verify_peer: bool = False            # ask for (and check) a client certificate
    fail_if_no_peer_cert: bool = False   # refuse clients without one


class BrokerNode:
    """A RabbitMQ node of our own (see the module docstring)."""

    def __init__(self, name: Optional[str] = None, tls: Optional[TlsOptions] = None,
                 base_dir: Optional[str] = None, extra_conf: str = "", user: str = "guest",
                 password: str = "guest", management: bool = False, advanced_config: str = "[]"):
        why = unavailable_reason()
        if why:
            raise unittest.SkipTest("second RabbitMQ node unavailable: " + why)
        short = name or "er-test-%d-%s" % (os.getpid(), secrets.token_hex(3))
        self.nodename = short if "@" in short else short + "@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls else None
        # The management plugin (HTTP API) on a port of its own, 127.0.0.1 only.
        self.management_port = free_port() if management else None
        self.user = user
        self.password = password
        self._own_base = base_dir is None
        self.base = base_dir or tempfile.mkdtemp(prefix="er-node-")
        os.chmod(self.base, 0o755)
        self.mnesia_base = os.path.join(self.base, "mnesia")
        self.log_dir = os.path.join(self.base, "log")
        self.config_file = os.path.join(self.base, "rabbitmq.conf")
        self.advanced_config = os.path.join(self.base, "advanced.config")
        self.plugins_file = os.path.join(self.base, "enabled_plugins")
        self.stdout_path = os.path.join(self.base, "server.out")
        for d in (self.mnesia_base, self.log_dir):
            os.makedirs(d, exist_ok=True)
        self.extra_conf = extra_conf
        self.advanced_config_term = advanced_config
        self._write_files()
        _chown_rabbitmq(self.base)
        self.proc: Optional[subprocess.Popen] = None
        self._out = None
        self._closed = False

    # -- class-level convenience ----------------------------------------------------

    @classmethod
    def for_class(cls, test_class, start: bool = True, **kwargs) -> "BrokerNode":
        """A node for a whole test class, closed by a class cleanup (call it
        from setUpClass)."""
        node = cls(**kwargs)
        test_class.addClassCleanup(node.close)
        if start:
            node.start()
        return node

    def __enter__(self) -> "BrokerNode":
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- files ----------------------------------------------------------------------

    def _write_files(self) -> None:
        lines = [
            "listeners.tcp.default = %d" % self.port,
            "loopback_users.guest = true",
            "log.console = false",
            "log.file.level = info",
        ]
        if self.tls:
            t = self.tls
            lines += [
                "listeners.ssl.default = %d" % self.tls_port,
                "ssl_options.cacertfile = %s" % t.cacertfile,
                "ssl_options.certfile = %s" % t.certfile,
                "ssl_options.keyfile = %s" % t.keyfile,
                "ssl_options.verify = %s" % ("verify_peer" if t.verify_peer else "verify_none"),
                "ssl_options.fail_if_no_peer_cert = %s" % ("true" if t.fail_if_no_peer_cert else "false"),
            ]
        if self.management_port:
            lines += ["management.tcp.port = %d" % self.management_port, "management.tcp.ip = 127.0.0.1"]
        if self.extra_conf:
            lines.append(self.extra_conf.strip())
        with open(self.config_file, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(self.advanced_config, "w") as f:
            f.write(self.advanced_config_term.strip() + ".\n")
        with open(self.plugins_file, "w") as f:
            f.write("[rabbitmq_management].\n" if self.management_port else "[].\n")

    def _env(self) -> Dict[str, str]:
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": RABBITMQ_HOME,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": self.mnesia_base,
            "RABBITMQ_LOG_BASE": self.log_dir,
            "RABBITMQ_CONFIG_FILE": self.config_file,
            "RABBITMQ_ADVANCED_CONFIG_FILE": self.advanced_config,
            "RABBITMQ_ENABLED_PLUGINS_FILE": self.plugins_file,
            # No /etc/rabbitmq/rabbitmq-env.conf surprises.
            "RABBITMQ_CONF_ENV_FILE": os.path.join(self.base, "rabbitmq-env.conf"),
        }

    # -- URLs -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return "amqp://%s:%s@127.0.0.1:%d/" % (self.user, self.password, self.port)

    def management_url(self, user: Optional[str] = None, password: Optional[str] = None) -> str:
        """http://[user:password@]127.0.0.1:<management_port>/ (a node made with management=True)."""
        if not self.management_port:
            raise ValueError("this node has no management listener")
        auth = "%s:%s@" % (user, password) if user is not None else ""
        return "http://%s127.0.0.1:%d/" % (auth, self.management_port)

    def add_user(self, name: str, password: str, tags=(), vhost: str = "/") -> None:
        """A user with full permissions on `vhost` and these tags (e.g.
        "management", "administrator"; none: AMQP only, no HTTP API)."""
        self.ctl("add_user", name, password)
        self.ctl("set_user_tags", name, *tags)
        self.ctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")

    def amqps_url(self, host: str = "localhost") -> str:
        if not self.tls_port:
            raise ValueError("this node has no TLS listener")
        return "amqps://%s:%s@%s:%d/" % (self.user, self.password, host, self.tls_port)

    # -- lifecycle ------------------------------------------------------------------

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 120.0) -> "BrokerNode":
        """Starts the node (same name, ports and data as before) and waits until
        it accepts AMQP connections."""
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Starts the node without waiting (see wait_ready): several nodes can
        boot at once."""
        if self._closed:
            raise RuntimeError("node %s is closed" % self.nodename)
        if self.running():
            return
        self._wait_ports_closed(10)
        if port_open(self.port):
            raise RuntimeError("port %d of node %s is taken by someone else" % (self.port, self.nodename))
        if not os.path.exists(os.path.join(self.base, "rabbitmq-env.conf")):
            with open(os.path.join(self.base, "rabbitmq-env.conf"), "w") as f:
                f.write("# empty: node settings come from the environment\n")
            _chown_rabbitmq(self.base)
        self._out = open(self.stdout_path, "ab")
        argv = _as_rabbitmq([os.path.join(RABBITMQ_BIN, "rabbitmq-server")], self._env())
        self.proc = subprocess.Popen(argv, cwd=self.base, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if self not in _LIVE:
            _LIVE.append(self)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if not self.running():
                raise RuntimeError("node %s exited (status %s) while starting:\n%s"
                                   % (self.nodename, self.proc.returncode if self.proc else None, self.tail()))
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("node %s not ready within %.0fs (last: %s):\n%s"
                                   % (self.nodename, timeout, last, self.tail()))
            try:
                p = self._ctl_proc(["await_startup", "--timeout", str(max(1, int(min(left, 15))))],
                                   timeout=min(left, 15) + 15)
            except subprocess.TimeoutExpired:  # the CLI itself is slow on a loaded machine: ask again
                last = "rabbitmqctl await_startup did not return"
                continue
            if (p.returncode == 0 and port_open(self.port) and (not self.tls_port or port_open(self.tls_port))
                    and (not self.management_port or port_open(self.management_port))):
                return
            last = (p.stdout + p.stderr).strip()[-300:]
            time.sleep(0.5)

    def stop(self, timeout: float = 60.0) -> None:
        """Stops the node (rabbitmqctl stop, else SIGTERM, else SIGKILL); its
        data dir stays for the next start()."""
        if not self.running():
            self._reap()
            return
        try:
            self._ctl_proc(["stop"], timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.running():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        if self.running():
            self.kill()
        self._reap()
        self._wait_ports_closed()

    def kill(self) -> None:
        """SIGKILL to the node's whole process group (a crash, not a stop)."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self._reap()
        self._wait_ports_closed()

    def _wait_ports_closed(self, timeout: float = 15.0) -> None:
        # The VM (a grandchild) may outlive its parent process by a moment.
        deadline = time.monotonic() + timeout
        ports = [p for p in (self.port, self.tls_port, self.management_port) if p]
        while any(port_open(p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        """Stops the node and deletes its base dir (unless ER_KEEP_TMP=1)."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            if self in _LIVE:
                _LIVE.remove(self)
            if self._own_base and os.environ.get("ER_KEEP_TMP") != "1":
                shutil.rmtree(self.base, ignore_errors=True)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.poll()
        if self._out is not None:
            try:
                self._out.close()
            except Exception:
                pass
            self._out = None

    # -- rabbitmqctl ----------------------------------------------------------------

    def _ctl_proc(self, args: List[str], timeout: float = 60.0, tool: str = "rabbitmqctl") -> subprocess.CompletedProcess:
        env = {"PATH": self._env()["PATH"], "HOME": RABBITMQ_HOME, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        argv = _as_rabbitmq([os.path.join(RABBITMQ_BIN, tool), "-n", self.nodename, *args], env)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=RABBITMQ_HOME,
                              stdin=subprocess.DEVNULL)

    def ctl(self, *args: str, timeout: float = 60.0, tool: str = "rabbitmqctl") -> str:
        """`rabbitmqctl -n NODE args...` (or another CLI tool: `tool="rabbitmq-upgrade"`,
        `"rabbitmq-queues"`); raises RuntimeError when it fails."""
        p = self._ctl_proc(list(args), timeout=timeout, tool=tool)
        if p.returncode != 0:
            raise RuntimeError("%s -n %s %s failed (%d): %s%s"
                               % (tool, self.nodename, " ".join(args), p.returncode, p.stdout, p.stderr))
        return p.stdout

    def ctl_json(self, *args: str) -> list:
        out = self.ctl(*args, "-q", "--formatter", "json").strip()
        return json.loads(out) if out else []

    def tail(self, n: int = 40) -> str:
        """The end of the node's start-up output and of its log file."""
        parts = []
        for path in [self.stdout_path] + sorted(
                os.path.join(self.log_dir, f) for f in (os.listdir(self.log_dir) if os.path.isdir(self.log_dir) else [])
                if f.endswith(".log")):
            try:
                with open(path, "rb") as f:
                    lines = f.read().decode("utf-8", "replace").splitlines()
                parts.append("== %s ==\n%s" % (path, "\n".join(lines[-n:])))
            except OSError:
                pass
        return "\n".join(parts)


@atexit.register
def _stop_leftovers() -> None:
    for node in list(_LIVE):
        try:
            node.close()
        except Exception:
            node.kill()


# ---------------------------------------------------------------------------
# Test certificates


@dataclass
class Pki:
    dir: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _openssl(*args: str, cwd: str) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError("openssl %s failed (%d): %s%s" % (" ".join(args), p.returncode, p.stdout, p.stderr))


def make_ca(directory: str, name: str = "ca", cn: str = "event-router test CA") -> (str, str):
    """A self-signed CA in `directory`: (<name>.pem, <name>.key)."""
    cert, key = os.path.join(directory, name + ".pem"), os.path.join(directory, name + ".key")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
             "-subj", "/CN=%s %s" % (cn, secrets.token_hex(3)),
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)
    return cert, key


def make_cert(directory: str, name: str, ca_cert: str, ca_key: str, cn: str, server: bool) -> (str, str):
    """A leaf certificate signed by the CA: (<name>.pem, <name>.key)."""
    cert, key, csr = (os.path.join(directory, name + ext) for ext in (".pem", ".key", ".csr"))
    ext_file = os.path.join(directory, name + ".ext")
    with open(ext_file, "w") as f:
        f.write("basicConstraints=CA:FALSE\n")
        f.write("keyUsage=critical,digitalSignature,keyEncipherment\n")
        if server:
            f.write("extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
        else:
            f.write("extendedKeyUsage=clientAuth\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=" + cn,
             cwd=directory)
    _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
             "-days", "2", "-extfile", ext_file, cwd=directory)
    return cert, key


def make_test_pki(directory: Optional[str] = None) -> Pki:
    """A CA, a server certificate (CN and SAN localhost, SAN 127.0.0.1) and a
    client certificate (CN er-test-client), all readable by the rabbitmq user."""
    d = directory or tempfile.mkdtemp(prefix="er-pki-")
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    ca_cert, ca_key = make_ca(d)
    server_cert, server_key = make_cert(d, "server", ca_cert, ca_key, "localhost", server=True)
    client_cert, client_key = make_cert(d, "client", ca_cert, ca_key, "er-test-client", server=False)
    _chown_rabbitmq(d)
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o640 if f.endswith(".key") else 0o644)
    return Pki(d, ca_cert, ca_key, server_cert, server_key, client_cert, client_key)


# ---------------------------------------------------------------------------
# Small helpers shared by test_http_metrics, test_logs, test_tls, test_notify


def http_get(url: str, timeout: float = 5.0):
    """(status, content_type, body text) of a GET; HTTP errors are answers too.
    Raises OSError when nothing answers."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode("utf-8", "replace")


async def publish_events(url: str, exchange: str, events, routing_key: Optional[str] = None, ssl_context=None):
    """Publishes snake_case events (dicts, or raw bytes with `routing_key`) to
    `exchange` on the broker at `url`: persistent, confirmed, message_id and
    correlation_id set like the Python services do."""
    import aio_pika
    kwargs = {"ssl_context": ssl_context} if ssl_context is not None else {}
    conn = await aio_pika.connect(url, **kwargs)
    try:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(exchange, ensure=True)
        for ev in events:
            if isinstance(ev, (bytes, bytearray)):
                msg = aio_pika.Message(body=bytes(ev), content_type="application/json",
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await ex.publish(msg, routing_key=routing_key or "")
                continue
            msg = aio_pika.Message(body=json.dumps(ev).encode(), content_type="application/json",
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   message_id=ev.get("event_id"), correlation_id=ev.get("correlation_id"),
                                   type=ev.get("event_type"))
            await ex.publish(msg, routing_key=routing_key or ev["event_type"])
    finally:
        await conn.close()
