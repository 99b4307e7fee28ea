#!/usr/bin/env bash
# Container test: builds the image (Dockerfile) with buildah, runs the daemon
# from it against the local RabbitMQ, publishes events and checks they are
# handled, the health check, the non-root user and a clean SIGTERM exit.
# Also checks docker/docker-compose.yml statically (no engine here).
# Exit 77 (skip) when buildah/debootstrap are missing or unusable.
# See tests/container/README.md for the environment variables.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${ER_CONTAINER_CACHE:-/var/cache/event-router-test}
IMAGE=${ER_CONTAINER_IMAGE:-localhost/event-router:test}
EXAMPLE_IMAGE=${ER_CONTAINER_EXAMPLE_IMAGE:-localhost/event-router-example-service:test}
JOBS=${ER_CONTAINER_JOBS:-2}
MIRROR=${ER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
AMQP_URL=${ER_AMQP_URL:-${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/}}
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

T0=$(date +%s.%N)
PHASE_T=$T0
say() { printf 'container-test: %s\n' "$*"; }
skip() { say "SKIP: $*"; exit 77; }
fail() { say "FAIL: $*" >&2; exit 1; }
# Prints the time since the last phase and since the start.
phase() {
  local now; now=$(date +%s.%N)
  awk -v n="$now" -v p="$PHASE_T" -v t="$T0" -v m="$*" \
    'BEGIN { printf "container-test: [%6.1fs, total %6.1fs] %s\n", n - p, n - t, m }'
  PHASE_T=$now
}

# --static: only the compose check (no buildah, no broker), for quick runs.
STATIC_ONLY=0
[ "${1:-}" = --static ] && STATIC_ONLY=1

# --- prerequisites ------------------------------------------------------------
if [ "$STATIC_ONLY" = 0 ]; then
command -v buildah >/dev/null 2>&1 || skip "buildah is not installed (apt-get install buildah debootstrap)"
[ "$(id -u)" -eq 0 ] || skip "needs root (buildah with chroot isolation and the system storage)"
buildah info >/dev/null 2>&1 || skip "buildah is unusable here: $(buildah info 2>&1 | tail -1)"
fi
"$PY" -c "import aio_pika, yaml" 2>/dev/null ||
  fail "$PY lacks aio_pika or yaml: apt-get install python3-aio-pika python3-yaml (scripts/install-deps.sh)"

mkdir -p "$CACHE"
WORK=$(mktemp -d /tmp/er-container-test.XXXXXX)
PREFIX="ct-$(date +%s)-$$"
CTR=""
DAEMON_BPID=""
SCTR=""
SERVICE_BPID=""

cat > "$WORK/helper.py" <<'PYEOF'
import asyncio, json, os, re, signal, socket, subprocess, sys, time, uuid
from datetime import datetime, timezone
import aio_pika, yaml

URL = os.environ["AMQP_URL"]

def now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

def event(t, agg, payload):
    return {"event_id": str(uuid.uuid4()), "event_type": t, "aggregate_id": agg,
            "aggregate_type": t.split(".")[0], "correlation_id": str(uuid.uuid4()),
            "timestamp": now(), "version": 1, "payload": payload}

async def publish(exchange):
    # One event per queue: plugin (speaker, evaluation), sh (draft), python worker (rag).
    evs = [event("speaker.onboarded", "s1", {"speaker_id": "s1", "external_id": "e1", "name": "N", "bucket": "GOOD"}),
           event("draft.ingested", "d1", {"draft_id": "d1", "speaker_id": "s1", "source": "ct", "word_count": 3}),
           event("rag.dfn_generated", "r1", {"dfn_id": "r1", "speaker_id": "s1", "draft_id": "d1"}),
           event("evaluation.completed", "v1", {"evaluation_id": "v1", "dfn_id": "r1", "score": 0.5})]
    conn = await aio_pika.connect(URL)
    async with conn:
        ch = await conn.channel()
        ex = await ch.get_exchange(exchange, ensure=True)  # declared by the daemon
        for e in evs:
            await ex.publish(aio_pika.Message(json.dumps(e).encode(), content_type="application/json",
                                              message_id=e["event_id"], type=e["event_type"],
                                              correlation_id=e["correlation_id"],
                                              delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                             routing_key=e["event_type"])
            print(e["event_type"], e["event_id"])

async def counts(names):
    conn = await aio_pika.connect(URL)
    out = {}
    async with conn:
        for n in names:
            ch = await conn.channel()
            q = await ch.declare_queue(n, passive=True)
            out[n] = q.declaration_result.message_count
            await ch.close()
    return out

async def cleanup(names, prefix):
    names = set(names)
    try:  # also whatever else the daemon declared with our prefix
        rows = json.loads(subprocess.run(["rabbitmqctl", "-q", "--formatter", "json", "list_queues", "name"],
                                         capture_output=True, text=True, timeout=60).stdout or "[]")
        names.update(r["name"] for r in rows if r["name"].startswith(prefix))
    except Exception:
        pass
    conn = await aio_pika.connect(URL)
    async with conn:
        for n in sorted(names):
            for kind in ("queue", "exchange"):
                try:
                    ch = await conn.channel()
                    await (ch.queue_delete(n) if kind == "queue" else ch.exchange_delete(n))
                    await ch.close()
                except Exception:
                    pass
    print("deleted", len(names), "queues/exchanges with prefix", prefix)

def compose_check(src):
    """Static checks of docker/: the compose file and the config it mounts."""
    d = os.path.join(src, "docker")
    c = yaml.safe_load(open(os.path.join(d, "docker-compose.yml")))
    errs = []
    svc = c.get("services", {})
    mq, rt = svc.get("rabbitmq", {}), svc.get("event-router", {})
    if not str(mq.get("image", "")).startswith("rabbitmq:3-management"): errs.append("rabbitmq: image")
    if "rabbitmq-diagnostics" not in json.dumps(mq.get("healthcheck", {})): errs.append("rabbitmq: healthcheck")
    b = rt.get("build", {})
    ctx = os.path.normpath(os.path.join(d, b.get("context", ".")))
    if not os.path.isfile(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))): errs.append("router: build context/dockerfile")
    if rt.get("depends_on", {}).get("rabbitmq", {}).get("condition") != "service_healthy": errs.append("router: depends_on")
    if "health" not in json.dumps(rt.get("healthcheck", {})): errs.append("router: healthcheck")
    for v in ("RABBITMQ_URL", "RABBITMQ_EXCHANGE", "SPEAKER_QUEUE", "DRAFT_QUEUE", "RAG_QUEUE", "EVALUATION_QUEUE"):
        if v not in rt.get("environment", {}): errs.append("router: environment " + v)
    targets = {}
    for s in svc.values():
        for v in s.get("volumes", []):
            host, _, rest = v.partition(":")
            if host.startswith((".", "/")):
                if not os.path.exists(os.path.join(d, host)): errs.append("volume source missing: " + host)
                targets[rest.split(":")[0]] = os.path.normpath(os.path.join(d, host))
            elif host not in (c.get("volumes") or {}): errs.append("named volume not declared: " + host)
    # The mounted config: every exec and worker handler must be in the mounted handlers/.
    cfgfile = targets.get("/etc/event-router/router.yaml")
    hdir = targets.get("/etc/event-router/handlers")
    if not cfgfile or not hdir: errs.append("router: router.yaml and handlers/ mounts")
    else:
        cfg = yaml.safe_load(open(cfgfile))
        if "listen" not in (cfg.get("http") or {}): errs.append("router.yaml: no http.listen (HEALTHCHECK needs it)")
        for q in cfg.get("queues", []):
            for h in q.get("handlers", []):
                exe = (h.get("exec") or h.get("worker") or [None])[0]
                if exe and exe.startswith("handlers/"):
                    p = os.path.join(hdir, exe[len("handlers/"):])
                    if not os.access(p, os.X_OK): errs.append("handler %s: %s missing or not executable" % (h["name"], p))
                    ref = os.path.join(src, "config", exe)
                    if os.path.isfile(p) and os.path.isfile(ref) and open(p, "rb").read() != open(ref, "rb").read():
                        print("note: docker/%s differs from config/%s" % (exe, exe))
    if cfgfile:
        errs += http_endpoints(d, c, yaml.safe_load(open(cfgfile)))
    errs += compose_hardening(d, c)
    if errs: sys.exit("compose check failed: " + "; ".join(errs))
    print("compose ok: services", ", ".join(svc))
    cluster_check(src)

def http_endpoints(d, c, cfg):
    """Every http plugin handler of the mounted config reaches a service of
    the stack: its URL (the router's environment or the default) names a
    service that exposes that port, is healthy before the router starts and
    is built from a context with a Dockerfile that serves the handler's event
    types at that path."""
    errs, svc = [], c.get("services", {})
    rt = svc.get("event-router", {})
    env = {k: str(v) for k, v in (rt.get("environment") or {}).items()}
    found = 0
    for q in cfg.get("queues", []):
        for i, h in enumerate(q.get("handlers", [])):
            if "http_plugin" not in str(h.get("plugin", "")):
                continue
            found += 1
            # The first handler that matches an event wins: none before it may take its types.
            for t in h.get("events", []):
                for e in q["handlers"][:i]:
                    if any(topic_match(p, t) for p in e.get("events", [])):
                        errs.append("handler %s never gets %s: %s before it matches it" % (h["name"], t, e["name"]))
            url = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or m.group(2) or "",
                         str((h.get("config") or {}).get("url", "")))
            m = re.fullmatch(r"http://([\w.-]+)(?::(\d+))?(/[^?#]*)", url)
            if not m: errs.append("handler %s: url %r is not http://service:port/path" % (h["name"], url)); continue
            host, port, path = m.group(1), m.group(2) or "80", m.group(3)
            s = svc.get(host)
            if s is None: errs.append("handler %s: %s is not a service of the stack" % (h["name"], host)); continue
            if port not in [str(p) for p in s.get("expose", [])]: errs.append("%s: port %s not in expose" % (host, port))
            if (rt.get("depends_on") or {}).get(host, {}).get("condition") != "service_healthy":
                errs.append("router: depends_on %s: service_healthy" % host)
            if "healthcheck" not in s: errs.append("%s: healthcheck" % host)
            ctx = os.path.normpath(os.path.join(d, (s.get("build") or {}).get("context", "")))
            if not os.path.isfile(os.path.join(ctx, "Dockerfile")): errs.append("%s: build context without Dockerfile" % host); continue
            code = "".join(open(os.path.join(ctx, f)).read() for f in os.listdir(ctx) if f.endswith((".py", ".js", ".ts")))
            for t in h.get("events", []):
                if not re.search(r"[*#]", t) and '"%s"' % path.replace("{event_type}", t) not in code:
                    errs.append("%s: no route %s for handler %s" % (host, path.replace("{event_type}", t), h["name"]))
            if s.get("ports"): errs.append("%s: publishes host ports (the router reaches it on the compose network)" % host)
            errs += locked_down(host, s)
    if not found: errs.append("router.yaml: no http plugin handler (the example service)")
    return errs

def topic_match(pattern, key):
    """AMQP topic matching: * is one word, # zero or more."""
    def m(p, k):
        if not p: return not k
        if p[0] == "#": return m(p[1:], k) or (bool(k) and m(p, k[1:]))
        return bool(k) and p[0] in ("*", k[0]) and m(p[1:], k[1:])
    return m(pattern.split("."), key.split("."))

def locked_down(name, s):
    """A service that handles untrusted input: no root, no writable image,
    no capabilities, no setuid escalation, scratch files on a tmpfs."""
    errs = []
    if str(s.get("user", "0")).split(":")[0] in ("0", "root"): errs.append(name + ": user (not root)")
    if s.get("read_only") is not True: errs.append(name + ": read_only: true")
    if "ALL" not in (s.get("cap_drop") or []): errs.append(name + ": cap_drop: [ALL]")
    if "no-new-privileges:true" not in (s.get("security_opt") or []): errs.append(name + ": no-new-privileges")
    if "/tmp" not in [str(t).split(":")[0] for t in (s.get("tmpfs") or [])]: errs.append(name + ": tmpfs /tmp")
    return errs

def compose_hardening(d, c, file="docker-compose.yml", brokers=("rabbitmq",), routers=("event-router",),
                      url_vars=("RABBITMQ_URL",)):
    """SECURITY.md's promises for docker/: host ports on loopback, credentials
    from .env (none in the file), locked-down router containers."""
    errs = []
    text = open(os.path.join(d, file)).read()
    if re.search(r"guest", text): errs.append("compose file mentions guest credentials")
    for name, s in c.get("services", {}).items():
        for p in s.get("ports", []):
            if not str(p).startswith("127.0.0.1:"): errs.append("%s: port %r not bound to 127.0.0.1" % (name, p))
    needed = set(re.findall(r"\$\{(\w+):\?", text))
    for b in brokers:
        mq = c["services"].get(b, {})
        for k in ("RABBITMQ_DEFAULT_USER", "RABBITMQ_DEFAULT_PASS"):
            if not re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(mq.get("environment", {}).get(k, ""))):
                errs.append("%s: %s must be a required ${VAR:?...} from .env" % (b, k))
    example = os.path.join(d, ".env.example")
    if not os.path.isfile(example): errs.append(".env.example missing")
    else:
        defined = set(re.findall(r"(?m)^(\w+)=", open(example).read()))
        if needed - defined: errs.append(".env.example lacks " + ", ".join(sorted(needed - defined)))
    for r in routers:
        rt = c["services"].get(r, {})
        for u in url_vars:
            if not re.fullmatch(r"amqps?://\$\{\w+:\?[^}]*\}:\$\{\w+:\?[^}]*\}@.+", str(rt.get("environment", {}).get(u, ""))):
                errs.append("%s: %s credentials must come from .env" % (r, u))
        errs += locked_down(r, rt)
        state = [v for v in rt.get("volumes", []) if v.split(":")[1:2] == ["/var/lib/event-router"]]
        if not state or state[0].startswith((".", "/")): errs.append("%s: state on a named volume" % r)
    return errs

def cluster_check(src):
    """docker/docker-compose.cluster.yml (docs/scaling.md): three clustered
    RabbitMQ nodes, two router replicas, PostgreSQL, and what it mounts."""
    d = os.path.join(src, "docker")
    c = yaml.safe_load(open(os.path.join(d, "docker-compose.cluster.yml")))
    svc = c.get("services", {})
    nodes, routers = ["rabbit-%d" % i for i in (1, 2, 3)], ["router-1", "router-2"]
    errs = []
    for n in nodes + routers + ["postgres"]:
        if n not in svc: errs.append("service %s missing" % n)
    if errs: sys.exit("cluster compose check failed: " + "; ".join(errs))
    cookies = set()
    for n in nodes:
        s = svc[n]
        if not str(s.get("image", "")).startswith("rabbitmq:3-management"): errs.append(n + ": image")
        if s.get("hostname") != n: errs.append(n + ": hostname must be " + n + " (node rabbit@" + n + ")")
        if "rabbitmq-diagnostics" not in json.dumps(s.get("healthcheck", {})): errs.append(n + ": healthcheck")
        cookie = str(s.get("environment", {}).get("RABBITMQ_ERLANG_COOKIE", ""))
        if not re.fullmatch(r"\$\{\w+:\?[^}]*\}", cookie): errs.append(n + ": RABBITMQ_ERLANG_COOKIE from .env")
        cookies.add(cookie)
        mounts = {v.split(":")[1]: v.split(":")[0] for v in s.get("volumes", [])}
        conf = mounts.get("/etc/rabbitmq/conf.d/20-cluster.conf")
        if not conf or not os.path.isfile(os.path.join(d, conf)): errs.append(n + ": cluster conf mount")
        else:
            text = open(os.path.join(d, conf)).read()
            if not re.search(r"(?m)^cluster_formation\.peer_discovery_backend\s*=\s*classic_config\s*$", text):
                errs.append(conf + ": classic_config peer discovery")
            listed = set(re.findall(r"(?m)^cluster_formation\.classic_config\.nodes\.\d+\s*=\s*(\S+)\s*$", text))
            if listed != {"rabbit@" + m for m in nodes}: errs.append(conf + ": lists %s" % sorted(listed))
        adv = mounts.get("/etc/rabbitmq/advanced.config")
        if not adv or not os.path.isfile(os.path.join(d, adv)): errs.append(n + ": advanced.config mount")
        elif not re.search(r"\{dead_letter_worker_publisher_confirm_timeout,\s*\d+\}", open(os.path.join(d, adv)).read()):
            errs.append(adv + ": dead_letter_worker_publisher_confirm_timeout (retries caught in a failover)")
        data = mounts.get("/var/lib/rabbitmq")
        if not data or data.startswith((".", "/")): errs.append(n + ": data on a named volume")
        if n != nodes[0] and (s.get("depends_on") or {}).get(nodes[0], {}).get("condition") != "service_healthy":
            errs.append(n + ": must wait for %s (depends_on service_healthy)" % nodes[0])
    if len(cookies) != 1: errs.append("the nodes must share one Erlang cookie")
    datas = [v.split(":")[0] for n in nodes for v in svc[n].get("volumes", []) if v.split(":")[1] == "/var/lib/rabbitmq"]
    if len(set(datas)) != len(nodes): errs.append("each node needs its own data volume")
    pg = svc["postgres"]
    if not str(pg.get("image", "")).startswith("postgres:"): errs.append("postgres: image")
    if not re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(pg.get("environment", {}).get("POSTGRES_PASSWORD", ""))):
        errs.append("postgres: POSTGRES_PASSWORD from .env")
    if "pg_isready" not in json.dumps(pg.get("healthcheck", {})): errs.append("postgres: healthcheck")
    keys, states = set(), []
    for r in routers:
        s = svc[r]
        b = s.get("build", {})
        ctx = os.path.normpath(os.path.join(d, b.get("context", ".")))
        if not os.path.isfile(os.path.join(ctx, b.get("dockerfile", "Dockerfile"))): errs.append(r + ": build")
        deps = s.get("depends_on") or {}
        for n in nodes + ["postgres"]:
            if deps.get(n, {}).get("condition") != "service_healthy": errs.append("%s: depends_on %s" % (r, n))
        if "health" not in json.dumps(s.get("healthcheck", {})): errs.append(r + ": healthcheck")
        env = s.get("environment", {})
        for i, n in enumerate(nodes, 1):
            if "@%s:5672/" % n not in str(env.get("RABBITMQ_URL_%d" % i, "")): errs.append("%s: RABBITMQ_URL_%d -> %s" % (r, i, n))
        keys.add(str(env.get("EVENT_ROUTER_COPY_KEY", "")))
        mounts = {v.split(":")[1]: os.path.normpath(os.path.join(d, v.split(":")[0])) for v in s.get("volumes", [])
                  if v.startswith((".", "/"))}
        states += [v.split(":")[0] for v in s.get("volumes", []) if v.split(":")[1] == "/var/lib/event-router"]
        cfgfile, hdir = mounts.get("/etc/event-router/router.yaml"), mounts.get("/etc/event-router/handlers")
        if not cfgfile or not os.path.isfile(cfgfile) or not hdir: errs.append(r + ": config and handlers mounts"); continue
        cfg = yaml.safe_load(open(cfgfile))
        urls = (cfg.get("broker") or {}).get("urls") or []
        if urls != ["${RABBITMQ_URL_%d}" % i for i in (1, 2, 3)]: errs.append("%s: broker.urls must list the three nodes" % cfgfile)
        if (cfg.get("security") or {}).get("copy_key_env") != "EVENT_ROUTER_COPY_KEY":
            errs.append("%s: security.copy_key_env EVENT_ROUTER_COPY_KEY (one key for both replicas)" % cfgfile)
        if "listen" not in (cfg.get("http") or {}): errs.append(cfgfile + ": http.listen")
        for q in cfg.get("queues", []):
            if q.get("type") != "quorum": errs.append("%s: queue %s not quorum" % (cfgfile, q.get("name")))
            for h in q.get("handlers", []):
                exe = (h.get("exec") or h.get("worker") or [None])[0]
                if exe and exe.startswith("handlers/") and not os.access(os.path.join(hdir, exe[len("handlers/"):]), os.X_OK):
                    errs.append("%s: handler %s missing in docker/handlers" % (r, h["name"]))
    if len(keys) != 1 or not re.fullmatch(r"\$\{\w+:\?[^}]*\}", next(iter(keys))):
        errs.append("routers: one EVENT_ROUTER_COPY_KEY, from .env")
    if len(set(states)) != len(routers): errs.append("routers: each needs its own state volume (the dedupe store locks it)")
    for v in datas + states + ["postgres-data"]:
        if v not in (c.get("volumes") or {}): errs.append("named volume not declared: " + v)
    errs += compose_hardening(d, c, "docker-compose.cluster.yml", nodes, routers,
                              ["RABBITMQ_URL_%d" % i for i in (1, 2, 3)])
    if errs: sys.exit("cluster compose check failed: " + "; ".join(errs))
    print("cluster compose ok: services", ", ".join(svc))

def image_check(inspect_json):
    c = json.loads(inspect_json)["Docker"]["config"]
    errs = []
    if c.get("User") in (None, "", "0", "root") or str(c.get("User")).startswith(("0:", "root")): errs.append("User %r" % c.get("User"))
    if c.get("StopSignal") != "SIGTERM": errs.append("StopSignal %r" % c.get("StopSignal"))
    hc = (c.get("Healthcheck") or {}).get("Test") or []
    if hc[-3:] != ["event-router", "health", "--ready"]: errs.append("Healthcheck %r" % hc)
    if c.get("Entrypoint") != ["event-router"]: errs.append("Entrypoint %r" % c.get("Entrypoint"))
    if c.get("Cmd") != ["--config", "/etc/event-router/router.yaml"]: errs.append("Cmd %r" % c.get("Cmd"))
    env = dict(e.split("=", 1) for e in c.get("Env") or [])
    for v in ("RABBITMQ_URL", "RABBITMQ_EXCHANGE", "SPEAKER_QUEUE", "DRAFT_QUEUE", "RAG_QUEUE", "EVALUATION_QUEUE"):
        if not env.get(v): errs.append("Env " + v)
    if "/var/lib/event-router" not in (c.get("Volumes") or {}): errs.append("Volumes %r" % c.get("Volumes"))
    if errs: sys.exit("image config: " + "; ".join(errs))
    print("image config ok: user %s, healthcheck %s" % (c["User"], " ".join(hc[1:])))

def example_image_check(inspect_json):
    """docker/example-service's image: not root, a HEALTHCHECK, uvicorn on $HOST:$PORT."""
    c = json.loads(inspect_json)["Docker"]["config"]
    errs = []
    if str(c.get("User") or "0").split(":")[0] in ("0", "root"): errs.append("User %r" % c.get("User"))
    hc = (c.get("Healthcheck") or {}).get("Test") or []
    if "/healthz" not in " ".join(hc): errs.append("Healthcheck %r" % hc)
    if "uvicorn" not in " ".join(c.get("Cmd") or []): errs.append("Cmd %r" % c.get("Cmd"))
    if "8000/tcp" not in (c.get("ExposedPorts") or {}): errs.append("ExposedPorts %r" % c.get("ExposedPorts"))
    if errs: sys.exit("example service image config: " + "; ".join(errs))
    print("example service image config ok: user %s, healthcheck, %s" % (c["User"], " ".join(c["Cmd"])[:60]))

def image_argv(inspect_json, what):
    """The image's CMD, or its HEALTHCHECK command, one argument a line."""
    c = json.loads(inspect_json)["Docker"]["config"]
    print("\n".join(c["Cmd"] if what == "cmd" else c["Healthcheck"]["Test"][1:]))

async def publish_one(exchange, routing_key, payload="{}"):
    e = event(routing_key, "o1", json.loads(payload))
    conn = await aio_pika.connect(URL)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(exchange, ensure=True)
        await ex.publish(aio_pika.Message(json.dumps(e).encode(), content_type="application/json",
                                          message_id=e["event_id"], delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                         routing_key=routing_key, mandatory=True)
    print(e["event_id"])

def proc_stat(pid):
    """(state, ppid) of a process, or None once it is gone (reaped)."""
    try:
        text = open("/proc/%d/stat" % pid).read()
    except OSError:
        return None
    f = text[text.rindex(")") + 2:].split()
    return f[0], int(f[1])

def orphans_check(daemon, left, escaped):
    """After the handler's outcome: the process it left in its group is gone,
    the one that left the group (setsid) is adopted by the daemon, then reaped
    when it exits; no zombie anywhere below the daemon."""
    daemon, left, escaped = int(daemon), int(left), int(escaped)
    st = proc_stat(escaped)
    if st is None or st[1] != daemon:
        sys.exit("the escaped process %d is not the daemon's child: %r" % (escaped, st))
    # It would sleep on; ended here, so the check does not race a timer.
    os.kill(escaped, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while (proc_stat(left) or proc_stat(escaped)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc_stat(left): sys.exit("the handler's background process %d is still there: %r" % (left, proc_stat(left)))
    if proc_stat(escaped): sys.exit("the adopted process %d was not reaped: %r" % (escaped, proc_stat(escaped)))
    kids = {}
    for n in os.listdir("/proc"):
        st = proc_stat(int(n)) if n.isdigit() else None
        if st: kids.setdefault(st[1], []).append((int(n), st[0]))
    pending, zombies = [daemon], []
    while pending:
        for c, state in kids.get(pending.pop(), []):
            if state == "Z": zombies.append(c)
            pending.append(c)
    if zombies: sys.exit("zombies below the daemon: %r" % zombies)
    print("background process %d killed, adopted process %d reaped, no zombie below the daemon %d"
          % (left, escaped, daemon))

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

cmd = sys.argv[1]
if cmd == "publish": asyncio.run(publish(sys.argv[2]))
elif cmd == "counts": print(json.dumps(asyncio.run(counts(sys.argv[2:]))))
elif cmd == "cleanup": asyncio.run(cleanup(sys.argv[3:], sys.argv[2]))
elif cmd == "compose-check": compose_check(sys.argv[2])
elif cmd == "image-check": image_check(sys.stdin.read())
elif cmd == "free-port": print(free_port())
elif cmd == "publish-one": asyncio.run(publish_one(*sys.argv[2:5]))
elif cmd == "example-image-check": example_image_check(sys.stdin.read())
elif cmd == "image-argv": image_argv(sys.stdin.read(), sys.argv[2])
elif cmd == "orphans-check": orphans_check(*sys.argv[2:5])
PYEOF
helper() { AMQP_URL=$AMQP_URL "$PY" "$WORK/helper.py" "$@"; }

# The descendant of $1 named $2, default event-router (buildah run -> chroot runtime -> process).
daemon_pid() {
  local pending=("$1") name=${2:-event-router} p f c
  while [ "${#pending[@]}" -gt 0 ]; do
    p=${pending[0]}; pending=("${pending[@]:1}")
    for f in /proc/[0-9]*/stat; do
      read -r c 2>/dev/null < "$f" || continue
      c=${c##*) }; c=${c#* }; c=${c%% *}   # field 4: ppid (after "pid (comm) state")
      [ "$c" = "$p" ] || continue
      f=${f#/proc/}; f=${f%/stat}
      if [ "$(cat /proc/"$f"/comm 2>/dev/null)" = "$name" ]; then echo "$f"; return 0; fi
      pending+=("$f")
    done
  done
  return 1
}

# The example service (uvicorn under buildah run): SIGTERM, then SIGKILL.
stop_service() {
  [ -n "$SERVICE_BPID" ] || return 0
  local sp; sp=$(daemon_pid "$SERVICE_BPID" python3)
  [ -n "$sp" ] && kill -TERM "$sp" 2>/dev/null
  for _ in $(seq 1 20); do kill -0 "$SERVICE_BPID" 2>/dev/null || break; sleep 0.5; done
  sp=$(daemon_pid "$SERVICE_BPID" python3); [ -n "$sp" ] && kill -KILL "$sp" 2>/dev/null
  wait "$SERVICE_BPID" 2>/dev/null
  SERVICE_BPID=""
}

BROKER_NAMES=()
cleanup() {
  local rc=$?
  set +e
  if [ -n "$DAEMON_BPID" ] && kill -0 "$DAEMON_BPID" 2>/dev/null; then
    local dp; dp=$(daemon_pid "$DAEMON_BPID")
    [ -n "$dp" ] && kill -TERM "$dp" 2>/dev/null
    for _ in $(seq 1 20); do kill -0 "$DAEMON_BPID" 2>/dev/null || break; sleep 0.5; done
    dp=$(daemon_pid "$DAEMON_BPID"); [ -n "$dp" ] && kill -KILL "$dp" 2>/dev/null
    kill -TERM "$DAEMON_BPID" 2>/dev/null; wait "$DAEMON_BPID" 2>/dev/null
  fi
  stop_service
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ -s "$WORK/daemon.log" ]; then
    echo "----- daemon log (last 60 lines) -----"; tail -n 60 "$WORK/daemon.log"; echo "-----"
  fi
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ -s "$WORK/service.log" ]; then
    echo "----- example service log (last 30 lines) -----"; tail -n 30 "$WORK/service.log"; echo "-----"
  fi
  [ -n "$CTR" ] && buildah rm "$CTR" >/dev/null 2>&1
  [ -n "$SCTR" ] && buildah rm "$SCTR" >/dev/null 2>&1
  if [ -n "${PORT:-}" ]; then helper cleanup "$PREFIX" "${BROKER_NAMES[@]}" 2>&1 | sed 's/^/container-test: /'; fi
  if [ "${ER_KEEP_TMP:-}" = 1 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; }; then
    say "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- static checks ------------------------------------------------------------
helper compose-check "$SRC" | sed 's/^/container-test: /'
phase "compose file and mounted config checked"
[ "$STATIC_ONLY" = 1 ] && exit 0

# One run at a time (shared image tag and cache).
exec 9>"$CACHE/lock"
flock -w 1200 9 || fail "another container test holds $CACHE/lock"

# --- base images: debian:bookworm and debian:bookworm-slim from one debootstrap tree
have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }
TARBALL=$CACHE/debian-bookworm-minbase.tar.gz
if [ "${ER_CONTAINER_REFRESH:-}" = 1 ]; then
  rm -f "$TARBALL"
  buildah rmi localhost/debian:bookworm localhost/debian:bookworm-slim >/dev/null 2>&1 || true
fi
if have_image debian:bookworm && have_image debian:bookworm-slim; then
  say "base images present: debian:bookworm $(buildah inspect --type image --format '{{.FromImageID}}' debian:bookworm | cut -c1-12)"
else
  if [ ! -s "$TARBALL" ]; then
    command -v debootstrap >/dev/null 2>&1 || skip "debootstrap is not installed and no base image is cached (apt-get install debootstrap)"
    ROOTFS=$CACHE/rootfs.tmp
    rm -rf "$ROOTFS"
    say "debootstrap --variant=minbase bookworm ($MIRROR)"
    debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 ||
      { tail -n 20 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
    # Like the official images: all bookworm suites, no package caches.
    rm -rf "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
      "$ROOTFS"/etc/apt/sources.list
    cat > "$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    tar --numeric-owner -C "$ROOTFS" -c . | gzip -1 > "$TARBALL.tmp" && mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$ROOTFS"
    phase "debootstrap done, cached $TARBALL ($(du -h "$TARBALL" | cut -f1))"
  fi
  base=$(buildah from --pull=never scratch)
  buildah add --quiet "$base" "$TARBALL" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash "$base"
  buildah commit --quiet --rm "$base" localhost/debian:bookworm >/dev/null
  buildah tag localhost/debian:bookworm localhost/debian:bookworm-slim
  phase "imported base images debian:bookworm and debian:bookworm-slim (same debootstrap tree)"
fi

# --- the image -------------------------------------------------------------------
say "buildah bud -t $IMAGE (log: $WORK/build.log)"
if ! buildah bud --isolation chroot --layers --pull=never --format docker --build-arg JOBS="$JOBS" \
    -f "$SRC/Dockerfile" -t "$IMAGE" "$SRC" > "$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log"
  fail "image build failed"
fi
SIZE=$(buildah images --noheading --format '{{.Size}}' "$IMAGE" | head -1)
phase "image built: $IMAGE, $SIZE"

buildah inspect --type image "$IMAGE" | helper image-check |
  sed 's/^/container-test: /'

# The compose stack's example service (docker/example-service), its own image.
say "buildah bud -t $EXAMPLE_IMAGE (log: $WORK/build-example.log)"
if ! buildah bud --isolation chroot --layers --pull=never --format docker \
    -f "$SRC/docker/example-service/Dockerfile" -t "$EXAMPLE_IMAGE" "$SRC/docker/example-service" \
    > "$WORK/build-example.log" 2>&1; then
  tail -n 40 "$WORK/build-example.log"
  fail "example service image build failed"
fi
buildah inspect --type image "$EXAMPLE_IMAGE" | helper example-image-check | sed 's/^/container-test: /'
phase "example service image built: $EXAMPLE_IMAGE, $(buildah images --noheading --format '{{.Size}}' "$EXAMPLE_IMAGE" | head -1)"

# --- run the daemon from the image ------------------------------------------------
PORT=$(helper free-port)
# The example service on the host's network (buildah run shares it), on
# 127.0.0.1 and a free port, running the image's own CMD; ready when the
# image's own HEALTHCHECK command passes.
SPORT=$(helper free-port)
SCTR=$(buildah from --pull=never --name "er-test-$PREFIX-svc" "$EXAMPLE_IMAGE")
mapfile -t SCMD < <(buildah inspect --type image "$EXAMPLE_IMAGE" | helper image-argv cmd)
mapfile -t SHEALTH < <(buildah inspect --type image "$EXAMPLE_IMAGE" | helper image-argv healthcheck)
SENV=(--env HOST=127.0.0.1 --env "PORT=$SPORT")
buildah run --isolation chroot "${SENV[@]}" "$SCTR" -- "${SCMD[@]}" > "$WORK/service.log" 2>&1 &
SERVICE_BPID=$!
deadline=$((SECONDS + 60))
until buildah run --isolation chroot "${SENV[@]}" "$SCTR" -- "${SHEALTH[@]}" > /dev/null 2>&1; do
  kill -0 "$SERVICE_BPID" 2>/dev/null || fail "the example service exited before it was healthy"
  [ "$SECONDS" -lt "$deadline" ] || fail "the example service is not healthy after 60 s"
  sleep 0.5
done
phase "example service healthy (127.0.0.1:$SPORT, the image's HEALTHCHECK)"
ENVS=(--env "EVALUATION_SERVICE_URL=http://127.0.0.1:$SPORT" --env "RABBITMQ_URL=$AMQP_URL" --env "RABBITMQ_EXCHANGE=$PREFIX.events"
      --env "SPEAKER_QUEUE=$PREFIX.speaker" --env "DRAFT_QUEUE=$PREFIX.draft"
      --env "RAG_QUEUE=$PREFIX.rag" --env "EVALUATION_QUEUE=$PREFIX.evaluation"
      --env "EVENT_ROUTER_HTTP=127.0.0.1:$PORT")
CTR=$(buildah from --pull=never --name "er-test-$PREFIX" "$IMAGE")
run_in() { buildah run --isolation chroot "${ENVS[@]}" "$CTR" -- "$@"; }
# The Node worker helper where node's require() finds it (clients/node/README.md).
run_in sh -c 'test -f /usr/share/nodejs/@event-router/worker/index.js && test -L /usr/lib/node/@event-router/worker' ||
  fail "the image lacks @event-router/worker in /usr/share/nodejs (or its /usr/lib/node link)"

# Runs the daemon from the image with config $1 (log $WORK/daemon.log) until
# it is ready; sets DAEMON_BPID (buildah run) and DPID (the daemon).
start_daemon() {
  : > "$WORK/daemon.log"  # before the first grep, which may run before the redirect
  run_in event-router --config "$1" > "$WORK/daemon.log" 2>&1 &
  DAEMON_BPID=$!
  local deadline=$((SECONDS + 60))
  until grep -qE '^\S+ \S+ ready( |$)' "$WORK/daemon.log"; do
    kill -0 "$DAEMON_BPID" 2>/dev/null || fail "the daemon ($1) exited before it was ready"
    [ "$SECONDS" -lt "$deadline" ] || fail "the daemon ($1) is not ready after 60 s"
    sleep 0.2
  done
  DPID=$(daemon_pid "$DAEMON_BPID") || fail "cannot find the daemon process under buildah run ($DAEMON_BPID)"
}
# Waits until event id $1 ($2 names it) is logged handled with outcome=ack, by $3 (in $SECONDS).
wait_acked() {
  until grep -E " handled .*event_id=$1( |$)" "$WORK/daemon.log" | grep -q "outcome=ack"; do
    [ "$SECONDS" -lt "$3" ] || fail "event $2 ($1) not handled with outcome=ack within 30 s"
    sleep 0.2
  done
}
# SIGTERM; the daemon must exit 0.
stop_daemon() {
  local rc
  kill -TERM "$DPID"
  set +e
  wait "$DAEMON_BPID"; rc=$?
  set -e
  DAEMON_BPID=""
  [ "$rc" -eq 0 ] || fail "the daemon exited $rc after SIGTERM"
}

# The config check names everything the daemon declares (for the cleanup).
run_in event-router --check --config /etc/event-router/router.yaml > "$WORK/check.log" 2>&1 ||
  { cat "$WORK/check.log"; fail "event-router --check failed in the image"; }
mapfile -t BROKER_NAMES < <(grep -o "$PREFIX[^ ,]*" "$WORK/check.log" | sort -u)
QUEUES=("$PREFIX.speaker" "$PREFIX.draft" "$PREFIX.rag" "$PREFIX.evaluation")

start_daemon /etc/event-router/router.yaml
phase "daemon ready (pid $DPID, http 127.0.0.1:$PORT, exchange $PREFIX.events)"

# Non-root: the daemon process itself, and the image's user.
DUID=$(awk '/^Uid:/ {print $2}' /proc/"$DPID"/status)
[ "$DUID" != 0 ] || fail "the daemon runs as root"
CUID=$(run_in id -u)
[ "$CUID" != 0 ] || fail "the image's user is root"
say "daemon uid $DUID, container id -u $CUID"

run_in event-router health --ready > "$WORK/health.log" 2>&1 ||
  { cat "$WORK/health.log"; fail "event-router health --ready failed"; }
say "health --ready: $(head -1 "$WORK/health.log")"
phase "non-root and health checked"

mapfile -t PUBLISHED < <(helper publish "$PREFIX.events")
[ "${#PUBLISHED[@]}" -eq 4 ] || fail "publishing failed"
deadline=$((SECONDS + 30))
for line in "${PUBLISHED[@]}"; do
  id=${line#* }
  wait_acked "$id" "${line% *}" "$deadline"
  say "handled ${line% *} outcome=ack"
done
# Every queue and its dead-letter queue empty.
for _ in $(seq 1 25); do
  COUNTS=$(helper counts "${QUEUES[@]}" "${QUEUES[@]/%/.dlq}")
  "$PY" -c 'import json,sys; sys.exit(any(json.loads(sys.argv[1]).values()))' "$COUNTS" && break
  sleep 0.2
done
"$PY" -c 'import json,sys; sys.exit(any(json.loads(sys.argv[1]).values()))' "$COUNTS" ||
  fail "queues not empty: $COUNTS"
phase "4 events handled (plugins, an sh exec handler, a python worker), queues and dead-letter queues empty"

# The evaluation event went through the http plugin to the example service.
EVAL_ID=$(printf '%s\n' "${PUBLISHED[@]}" | awk '$1 == "evaluation.completed" {print $2}')
grep -E " handled .*event_id=$EVAL_ID( |$)" "$WORK/daemon.log" | grep " handler=evaluation-service " | grep -q "outcome=ack" ||
  fail "no 'handled ... handler=evaluation-service outcome=ack' line for $EVAL_ID"
# buildah relays the service's stdout to service.log on its own schedule: the
# line can land after the daemon has logged the ack.
deadline=$((SECONDS + 10))
until grep -q "^evaluation 'v1' score 0.5 (attempt 1)" "$WORK/service.log"; do
  [ "$SECONDS" -lt "$deadline" ] || fail "the example service did not log the evaluation it was pushed"
  sleep 0.2
done
# A payload the service refuses (score out of range: FastAPI's 422) is
# dead-lettered with the status in the reason, not retried.
BAD_ID=$(helper publish-one "$PREFIX.events" evaluation.completed '{"evaluation_id": "v2", "dfn_id": "r1", "score": 7}')
deadline=$((SECONDS + 30))
until grep -E " handled .*event_id=$BAD_ID( |$)" "$WORK/daemon.log" | grep " handler=evaluation-service " | grep -q "outcome=dead-letter"; do
  [ "$SECONDS" -lt "$deadline" ] || fail "the refused evaluation ($BAD_ID) was not dead-lettered within 30 s"
  sleep 0.2
done
grep -E " handled .*event_id=$BAD_ID( |$)" "$WORK/daemon.log" | grep " handler=evaluation-service " | grep -q "422" ||
  fail "the dead-letter line of $BAD_ID does not name the status 422"
for _ in $(seq 1 25); do
  COUNTS=$(helper counts "$PREFIX.evaluation.dlq")
  [ "$COUNTS" = "{\"$PREFIX.evaluation.dlq\": 1}" ] && break
  sleep 0.2
done
[ "$COUNTS" = "{\"$PREFIX.evaluation.dlq\": 1}" ] || fail "expected the refused evaluation in the dead-letter queue: $COUNTS"
phase "http handler: an evaluation pushed to the example service (ack), a refused one dead-lettered (422)"

stop_daemon
grep -q ' stopped' "$WORK/daemon.log" || fail "no 'stopped' line in the daemon log"
phase "SIGTERM: daemon exited 0"

# --- orphans: a handler that leaves processes behind -----------------------------
# A second daemon from the image with one exec handler that backgrounds a
# process in its group and one in a session of its own (setsid), and prints
# their pids (its stdout goes to the daemon's log).
ORPH=$WORK/er-orphans
mkdir -p "$ORPH"
# The handler waits until the setsid one leads its own session (field 6 of
# /proc/PID/stat), or the group kill at its exit could still catch it.
cat > "$ORPH/background.sh" <<'SH'
#!/bin/sh
cat >/dev/null
sleep 300 </dev/null >/dev/null 2>&1 &
echo "left=$!"
setsid sleep 300 </dev/null >/dev/null 2>&1 &
pid=$!
echo "escaped=$pid"
while [ "$(cut -d' ' -f6 /proc/$pid/stat)" != "$pid" ]; do sleep 0.01; done
exit 0
SH
chmod 0755 "$ORPH/background.sh"
printf '%s\n' "broker: {url: \"$AMQP_URL\", heartbeat: 30s}" \
  "exchange: {name: \"$PREFIX.events\", type: topic}" "shutdown_timeout: 10s" "queues:" \
  "  - name: \"$PREFIX.orphans\"" "    bindings: [\"orphans.*\"]" "    handlers:" \
  "      - {name: background, events: [\"orphans.*\"], exec: [/opt/er-orphans/background.sh], timeout: 10s}" \
  > "$ORPH/orphans.yaml"
BROKER_NAMES+=("$PREFIX.orphans" "$PREFIX.orphans.dlq")
buildah copy --quiet --chown 10001:10001 "$CTR" "$ORPH" /opt/er-orphans >/dev/null
start_daemon /opt/er-orphans/orphans.yaml
id=$(helper publish-one "$PREFIX.events" orphans.created)
wait_acked "$id" orphans.created $((SECONDS + 30))
LEFT=$(grep -o 'left=[0-9]*' "$WORK/daemon.log" | head -1 | cut -d= -f2)
ESCAPED=$(grep -o 'escaped=[0-9]*' "$WORK/daemon.log" | head -1 | cut -d= -f2)
[ -n "$LEFT" ] && [ -n "$ESCAPED" ] || fail "the handler did not print its background pids"
helper orphans-check "$DPID" "$LEFT" "$ESCAPED" > "$WORK/orphans.out" 2>&1 ||
  { cat "$WORK/orphans.out"; fail "a handler's leftover process survived or a zombie remains"; }
say "$(cat "$WORK/orphans.out")"
stop_daemon
phase "orphans: background process killed, setsid one adopted and reaped, no zombie"
say "PASS (image $IMAGE, $SIZE)"
