#!/usr/bin/env python3
"""The checks of scripts/check-deploy that need Python (run in its venv).

1. Every manifest under deploy/kubernetes validates against the Kubernetes
   1.31 API schemas (kubernetes-validate, strict: unknown fields refused).
   Kinds without a built-in schema are validated against the schemas in
   deploy/kubernetes/schemas (ServiceMonitor, Kustomization), never skipped.
2. Each overlay (base + overlay), read as one deployment, holds together:
   selectors, port names, Secret keys behind the _FILE paths, probes,
   securityContext, grace period longer than the drain, and the mode's own
   rules (one StatefulSet replica on a single-writer volume; PostgreSQL for
   the Deployment). With kubectl on the PATH, `kubectl kustomize` renders
   each overlay too, and the rendered objects must be the same.
3. Every REFUND_WORKER__ variable in the manifests, docker-compose.yml and
   the Dockerfile names a key the worker reads (resolved against the
   settings structs in src/: an unknown key stops the worker with exit
   status 2).
4. docker-compose.yml and the Dockerfile: pinned images, a stop grace
   period longer than the drain, a numeric non-root user, the health check
   without a shell.
5. The dashboard JSON parses, and every metric name in it and in the alert
   rules is one src/observability/metrics.rs exports (`up` aside, which Prometheus
   records itself); deploy/monitoring/metric-names.txt lists them.
6. Every alert's runbook_url has its `### <AlertName>` heading.

Usage: check_deploy.py REPO_ROOT [--write-metric-names]
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import yaml
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

KUBERNETES_VERSION = "1.31.0"
NAMESPACE = "refunds"
# Metric names that Prometheus itself records for every target.
PROMETHEUS_SYNTHETIC = {"up"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
WRITE_METRIC_NAMES = "--write-metric-names" in sys.argv
errors = []
notes = []


def fail(message):
    errors.append(message)


def rel(path):
    return os.path.relpath(path, ROOT)


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# --------------------------------------------------------------------------
# The worker's settings, read from its source: which dotted keys exist.


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def block_after(text, start):
    """The text between the brace at or after `start` and its match."""
    open_at = text.index("{", start)
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    raise ValueError("unbalanced braces")


def split_top_level(body):
    """Splits a struct or enum body at commas outside <>, (), [] and {}."""
    parts, depth, current = [], 0, []
    for ch in body:
        if ch in "<([{":
            depth += 1
        elif ch in ">)]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def read_settings_types():
    structs, enums = {}, {}
    for folder, _, files in os.walk(os.path.join(ROOT, "src")):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(folder, name)
            text = strip_comments(open(path, encoding="utf-8").read())
            for m in re.finditer(r"((?:#\[[^\]]*\]\s*)*)pub\s+struct\s+(\w+)\s*\{", text):
                fields = {}
                for part in split_top_level(block_after(text, m.end() - 1)):
                    fm = re.search(r"((?:#\[[\s\S]*?\]\s*)*)pub\s+(\w+)\s*:\s*([\s\S]+)$", part.strip())
                    if not fm:
                        continue
                    attrs, field, ty = fm.group(1), fm.group(2), " ".join(fm.group(3).split())
                    names = [field]
                    rename = re.search(r'rename\s*=\s*"([^"]+)"', attrs)
                    if rename:
                        names = [rename.group(1)]
                    names += re.findall(r'alias\s*=\s*"([^"]+)"', attrs)
                    fields[field] = {"names": names, "type": ty, "flatten": "flatten" in attrs}
                structs.setdefault(m.group(2), []).append(fields)
            for m in re.finditer(r"((?:#\[[^\]]*\]\s*)*)pub\s+enum\s+(\w+)\s*\{", text):
                attrs = m.group(1)
                tag = re.search(r'tag\s*=\s*"([^"]+)"', attrs)
                variants = []
                for part in split_top_level(block_after(text, m.end() - 1)):
                    vm = re.search(r"(\w+)\s*\(\s*([\w:]+)\s*\)\s*$", part.strip())
                    if vm:
                        variants.append(vm.group(2).split("::")[-1])
                enums.setdefault(m.group(2), []).append(
                    {"tag": tag.group(1) if tag else None, "variants": variants}
                )
    return structs, enums


STRUCTS, ENUMS = read_settings_types()


def inner_type(ty):
    """Option<T>, Box<T>, Vec<T> -> T; maps -> ('map', V); else the name."""
    ty = ty.strip()
    m = re.match(r"^(?:[\w:]+::)?(Option|Box|Vec)<(.+)>$", ty)
    if m:
        return inner_type(m.group(2))
    m = re.match(r"^(?:[\w:]+::)?(BTreeMap|HashMap)<\s*String\s*,\s*(.+)>$", ty)
    if m:
        return ("map", m.group(2))
    return ty.split("::")[-1]


def fields_of(type_name, seen=()):
    """The keys a value of this type takes: {key: type}, or None for a leaf."""
    if type_name in seen:
        return {}
    if type_name in ENUMS and any(e["tag"] for e in ENUMS[type_name]):
        keys = {}
        for enum in ENUMS[type_name]:
            if enum["tag"]:
                keys[enum["tag"]] = "String"
            for variant in enum["variants"]:
                keys.update(fields_of(variant, seen + (type_name,)) or {})
        return keys
    if type_name not in STRUCTS:
        return None
    keys = {}
    for fields in STRUCTS[type_name]:
        for field in fields.values():
            if field["flatten"]:
                keys.update(fields_of(inner_type(field["type"]), seen + (type_name,)) or {})
            else:
                for name in field["names"]:
                    keys[name] = field["type"]
    return keys


def key_exists(dotted):
    """Whether the worker reads the dotted key (providers.<any>.kind, ...)."""
    parts = dotted.split(".")
    current = "Settings"
    i = 0
    while i < len(parts):
        if isinstance(current, tuple):  # a map: any name, then its values
            current = inner_type(current[1])
            i += 1
            continue
        keys = fields_of(current)
        if keys is None:
            return False  # a leaf with more parts below it
        if parts[i] not in keys:
            return False
        current = inner_type(keys[parts[i]])
        i += 1
    return not isinstance(current, tuple)


def check_env_name(name, where):
    if not name.startswith("REFUND_WORKER__"):
        return
    base = name[: -len("_FILE")] if name.endswith("_FILE") else name
    dotted = ".".join(p.lower() for p in base[len("REFUND_WORKER__") :].split("__"))
    if not key_exists(dotted):
        fail(f"{where}: {name} names no configuration key ({dotted}); the worker would stop with exit status 2")


if not key_exists("amqp.url") or not key_exists("providers.any.breaker.cooldown") or key_exists("cluster.enabled"):
    fail("check_deploy.py: reading the settings structs in src/ went wrong (self-check)")


def drain_seconds():
    text = open(os.path.join(ROOT, "src", "service", "app.rs"), encoding="utf-8").read()
    m = re.search(r"DRAIN_DEADLINE:\s*Duration\s*=\s*Duration::from_secs\((\d+)\)", text)
    if not m:
        fail("src/service/app.rs: DRAIN_DEADLINE not found; cannot check grace periods against the drain")
        return 30
    return int(m.group(1))


DRAIN = drain_seconds()


def duration_seconds(text):
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text)):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# --------------------------------------------------------------------------
# 1. Schema validation of every manifest.

KUBE_DIR = os.path.join(ROOT, "deploy", "kubernetes")
SCHEMA_DIR = os.path.join(KUBE_DIR, "schemas")
LOCAL_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.schema.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization.schema.json",
}
manifest_files = []
for folder, _, files in os.walk(KUBE_DIR):
    if os.path.abspath(folder).startswith(SCHEMA_DIR):
        continue
    for name in sorted(files):
        if name.endswith((".yaml", ".yml")):
            manifest_files.append(os.path.join(folder, name))
manifest_files.sort()

validated = 0
docs_by_file = {}


def validate_doc(doc, where):
    global validated
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in LOCAL_SCHEMAS:
        schema = json.load(open(os.path.join(SCHEMA_DIR, LOCAL_SCHEMAS[key])))
        try:
            jsonschema.validate(doc, schema)
            validated += 1
        except jsonschema.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            fail(f"{where}: {key[1]} does not match {LOCAL_SCHEMAS[key]}: {path}: {e.message}")
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        validated += 1
    except ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        fail(f"{where}: {key[1]} {doc.get('metadata', {}).get('name')}: not valid for Kubernetes {KUBERNETES_VERSION}: {path}: {e.message}")
    except SchemaNotFoundError as e:
        fail(f"{where}: no schema for {key[1]} ({key[0]}): {e.message}; add one to deploy/kubernetes/schemas")


for path in manifest_files:
    try:
        docs = load_yaml_docs(path)
    except yaml.YAMLError as e:
        fail(f"{rel(path)}: not YAML: {e}")
        continue
    docs_by_file[path] = docs
    for doc in docs:
        validate_doc(doc, rel(path))

print(f"manifests: {validated} objects in {len(manifest_files)} files valid (Kubernetes {KUBERNETES_VERSION}, strict; ServiceMonitor and Kustomization against deploy/kubernetes/schemas)")


# --------------------------------------------------------------------------
# 2. Each overlay as one deployment.


def kustomize_files(directory, seen=None):
    seen = seen if seen is not None else set()
    kfile = os.path.join(directory, "kustomization.yaml")
    if kfile in seen:
        return []
    seen.add(kfile)
    if not os.path.exists(kfile):
        fail(f"{rel(directory)}: no kustomization.yaml")
        return []
    out = []
    for resource in load_yaml_docs(kfile)[0].get("resources", []):
        target = os.path.normpath(os.path.join(directory, resource))
        if os.path.isdir(target):
            out += kustomize_files(target, seen)
        elif os.path.isfile(target):
            out.append(target)
        else:
            fail(f"{rel(kfile)}: resource {resource} does not exist")
    return out


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def pod_spec(workload):
    return workload["spec"]["template"]["spec"]


def check_overlay(name):
    directory = os.path.join(KUBE_DIR, name)
    where = f"overlay {name}"
    files = kustomize_files(directory)
    objects = [doc for f in files for doc in docs_by_file.get(f, [])]
    # Files in an overlay directory that its kustomization does not list
    # (the optional HPA, the Secret example) are complete manifests too.
    extras = {}
    for f in sorted(os.listdir(directory)):
        p = os.path.join(directory, f)
        if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml" and p not in files:
            for doc in docs_by_file.get(p, []):
                extras.setdefault(doc["kind"], []).append(doc)

    def of(kind):
        return [o for o in objects if o.get("kind") == kind]

    # With kubectl: the rendered overlay holds the same objects.
    if shutil.which("kubectl"):
        rendered = subprocess.run(["kubectl", "kustomize", directory], capture_output=True, text=True)
        if rendered.returncode != 0:
            fail(f"{where}: kubectl kustomize failed: {rendered.stderr.strip()}")
        else:
            docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
            for doc in docs:
                validate_doc(doc, f"{where} (kubectl kustomize)")
            ids = lambda objs: sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objs)
            if ids(docs) != ids(objects):
                fail(f"{where}: kubectl kustomize renders {ids(docs)}, the files hold {ids(objects)}")
            else:
                notes.append(f"{where}: kubectl kustomize renders the same {len(docs)} objects")

    for o in objects:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE:
            fail(f"{where}: {o['kind']} {o['metadata']['name']} is not in namespace {NAMESPACE}")
    if not any(o["kind"] == "Namespace" and o["metadata"]["name"] == NAMESPACE for o in objects):
        fail(f"{where}: no Namespace {NAMESPACE}")

    workloads = of("StatefulSet") + of("Deployment")
    if len(workloads) != 1:
        fail(f"{where}: expected one workload, found {len(workloads)}")
        return
    workload = workloads[0]
    wname = f"{where}: {workload['kind']} {workload['metadata']['name']}"
    template_labels = workload["spec"]["template"]["metadata"]["labels"]
    if not labels_match(workload["spec"]["selector"]["matchLabels"], template_labels):
        fail(f"{wname}: its selector does not match its pod labels")
    spec = pod_spec(workload)
    containers = spec["containers"]
    if len(containers) != 1:
        fail(f"{wname}: expected one container")
    c = containers[0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if set(ports) != {"http-private", "http-callbacks"}:
        fail(f"{wname}: container ports should be http-private and http-callbacks, are {sorted(ports)}")

    # The environment: every key known; listeners on the container ports.
    env = {}
    configmaps = {o["metadata"]["name"]: o for o in of("ConfigMap")}
    for source in c.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        if ref not in configmaps:
            fail(f"{wname}: envFrom ConfigMap {ref} is not in the overlay")
            continue
        for k, v in configmaps[ref].get("data", {}).items():
            env[k] = v
            check_env_name(k, f"{where}: ConfigMap {ref}")
    for item in c.get("env", []):
        if "value" not in item:
            fail(f"{wname}: env {item['name']} should be a plain value (secrets come from files)")
        env[item["name"]] = item.get("value")
        check_env_name(item["name"], wname)
    for key, port_name in (("REFUND_WORKER__HTTP__ADDR", "http-private"), ("REFUND_WORKER__HTTP__CALLBACK_ADDR", "http-callbacks")):
        addr = env.get(key, "")
        if not addr.startswith("0.0.0.0:") or int(addr.split(":")[1]) != ports.get(port_name):
            fail(f"{wname}: {key}={addr!r} does not listen on the {port_name} port {ports.get(port_name)}")
    secret_keys = {"REFUND_WORKER__AMQP__URL", "REFUND_WORKER__STORE__POSTGRES__URL", "REFUND_WORKER__HTTP__OPERATOR_TOKEN"}
    for k in env:
        if k in secret_keys or re.search(r"__(PASS_P|Z_PASS|PASSWORD|SECRET_KEY)$", k):
            fail(f"{wname}: {k} is a secret: use {k}_FILE with a mounted Secret")

    # Secrets: every _FILE path is a key of the Secret mounted there.
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    secrets = {o["metadata"]["name"]: o for o in of("Secret") + extras.get("Secret", [])}
    for k, v in env.items():
        if not k.endswith("_FILE"):
            continue
        found = False
        for mname, mount in mounts.items():
            prefix = mount["mountPath"].rstrip("/") + "/"
            vol = volumes.get(mname, {})
            if v.startswith(prefix) and "secret" in vol:
                found = True
                secret = secrets.get(vol["secret"]["secretName"])
                key = v[len(prefix) :]
                if secret is None:
                    fail(f"{wname}: Secret {vol['secret']['secretName']} has no example in the overlay")
                elif key not in {**secret.get("stringData", {}), **secret.get("data", {})}:
                    fail(f"{wname}: {k} reads {key}, which the Secret example {secret['metadata']['name']} lacks")
                if not mount.get("readOnly"):
                    fail(f"{wname}: the Secret mount {mount['mountPath']} should be readOnly")
        if not found:
            fail(f"{wname}: {k}={v} is not a file of a mounted Secret")

    # Grace period: longer than preStop + the drain.
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= pre_stop + DRAIN:
        fail(f"{wname}: terminationGracePeriodSeconds {grace} is not longer than preStop {pre_stop} s + the drain {DRAIN} s")

    # Restricted security context.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") and csc.get("runAsNonRoot", True)):
        fail(f"{wname}: runAsNonRoot must be true")
    if not isinstance(psc.get("runAsUser", csc.get("runAsUser")), int) or psc.get("runAsUser", csc.get("runAsUser")) == 0:
        fail(f"{wname}: runAsUser must be a non-zero uid")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault" and csc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(f"{wname}: seccompProfile must be RuntimeDefault")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(f"{wname}: allowPrivilegeEscalation must be false")
    if csc.get("readOnlyRootFilesystem") is not True:
        fail(f"{wname}: readOnlyRootFilesystem must be true")
    if csc.get("capabilities", {}).get("drop") != ["ALL"]:
        fail(f"{wname}: capabilities must drop ALL")
    if spec.get("automountServiceAccountToken") is not False:
        fail(f"{wname}: automountServiceAccountToken should be false")

    # Probes.
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != "http-private":
            fail(f"{wname}: {probe} should GET {path} on http-private")

    # Resources.
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in c.get("resources", {}).get(part, {}):
                fail(f"{wname}: resources.{part}.{res} missing")

    # Services, ServiceMonitor, NetworkPolicy, Ingress, PDB, HPA.
    services = {o["metadata"]["name"]: o for o in of("Service")}
    for s in services.values():
        if not labels_match(s["spec"].get("selector"), template_labels):
            fail(f"{where}: Service {s['metadata']['name']} selects no worker pod")
        for p in s["spec"].get("ports", []):
            if p.get("targetPort") not in ports:
                fail(f"{where}: Service {s['metadata']['name']} targets port {p.get('targetPort')}, not a container port")
        if s["spec"].get("type", "ClusterIP") != "ClusterIP":
            fail(f"{where}: Service {s['metadata']['name']} is {s['spec']['type']}: only the ingress faces outside")
    private = [s for s in services.values() if any(p.get("targetPort") == "http-private" for p in s["spec"].get("ports", []))]
    callbacks = [s for s in services.values() if any(p.get("targetPort") == "http-callbacks" for p in s["spec"].get("ports", []))]
    if len(private) != 1 or len(callbacks) != 1 or private[0] is callbacks[0]:
        fail(f"{where}: expected one Service for the private port and another for the callback port")
    for sm in of("ServiceMonitor"):
        chosen = [s for s in services.values() if labels_match(sm["spec"]["selector"].get("matchLabels"), s["metadata"].get("labels", {}))]
        if chosen != private:
            fail(f"{where}: ServiceMonitor {sm['metadata']['name']} should select exactly the private Service, selects {[s['metadata']['name'] for s in chosen]}")
        for ep in sm["spec"]["endpoints"]:
            if chosen and ep.get("port") not in {p.get("name") for p in chosen[0]["spec"]["ports"]}:
                fail(f"{where}: ServiceMonitor port {ep.get('port')} is not a port of {chosen[0]['metadata']['name']}")
            if ep.get("path", "/metrics") != "/metrics":
                fail(f"{where}: ServiceMonitor path should be /metrics")
        job_label = sm["spec"].get("jobLabel")
        if chosen and chosen[0]["metadata"].get("labels", {}).get(job_label) != "refund-worker":
            fail(f"{where}: ServiceMonitor jobLabel {job_label} does not give job=refund-worker (the alert rules' job)")
    if not of("ServiceMonitor"):
        fail(f"{where}: no ServiceMonitor")
    policies = of("NetworkPolicy")
    if not policies:
        fail(f"{where}: no NetworkPolicy")
    for np in policies:
        if not labels_match(np["spec"]["podSelector"].get("matchLabels"), template_labels):
            fail(f"{where}: NetworkPolicy {np['metadata']['name']} does not select the worker pods")
        if "Ingress" not in np["spec"].get("policyTypes", []):
            fail(f"{where}: NetworkPolicy {np['metadata']['name']} does not restrict ingress")
        allowed = {}
        for rule in np["spec"].get("ingress", []):
            if not rule.get("from"):
                fail(f"{where}: NetworkPolicy ingress rule without `from` opens to everyone")
            rule_ports = [p.get("port") for p in rule.get("ports", [])]
            if not rule_ports:
                fail(f"{where}: NetworkPolicy ingress rule without ports opens every port")
            for p in rule_ports:
                if p not in ports:
                    fail(f"{where}: NetworkPolicy port {p} is not a container port name")
                names = set()
                for peer in rule.get("from", []):
                    ns = peer.get("namespaceSelector")
                    if ns is None or "ipBlock" in peer:
                        fail(f"{where}: NetworkPolicy peer {peer} is not limited to namespaces")
                        continue
                    names |= {v for k, v in ns.get("matchLabels", {}).items() if k == "kubernetes.io/metadata.name"}
                    for e in ns.get("matchExpressions", []):
                        if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "In":
                            names |= set(e["values"])
                    if not names:
                        fail(f"{where}: NetworkPolicy peer {peer} does not name its namespaces")
                allowed.setdefault(p, set()).update(names)
        if allowed.get("http-callbacks") != {"ingress-nginx"}:
            fail(f"{where}: the callback port should be open to the ingress controller's namespace only, is to {allowed.get('http-callbacks')}")
        if not allowed.get("http-private") or "ingress-nginx" in allowed.get("http-private", set()):
            fail(f"{where}: the private port should be open to monitoring/operator namespaces only, is to {allowed.get('http-private')}")
    for ing in of("Ingress"):
        for rule in ing["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                backend = p["backend"]["service"]
                s = services.get(backend["name"])
                if s is None:
                    fail(f"{where}: Ingress routes to unknown Service {backend['name']}")
                elif s in private:
                    fail(f"{where}: Ingress routes to the private Service")
                elif backend["port"].get("name") not in {x.get("name") for x in s["spec"]["ports"]}:
                    fail(f"{where}: Ingress port {backend['port']} is not a port of {backend['name']}")
    pdbs = of("PodDisruptionBudget")
    if len(pdbs) != 1 or not labels_match(pdbs[0]["spec"]["selector"].get("matchLabels"), template_labels):
        fail(f"{where}: expected one PodDisruptionBudget selecting the worker pods")
    for hpa in of("HorizontalPodAutoscaler") + extras.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != (workload["kind"], workload["metadata"]["name"]):
            fail(f"{where}: HorizontalPodAutoscaler targets {ref['kind']} {ref['name']}")
    sa = spec.get("serviceAccountName")
    if sa and sa not in {o["metadata"]["name"] for o in of("ServiceAccount")}:
        fail(f"{wname}: ServiceAccount {sa} is not in the overlay")

    # The mode's own rules.
    backend = env.get("REFUND_WORKER__STORE__BACKEND", "sled")
    if workload["kind"] == "StatefulSet":
        s = workload["spec"]
        if backend != "sled":
            fail(f"{wname}: a StatefulSet is the sled mode; store.backend is {backend}")
        if s.get("replicas") != 1:
            fail(f"{wname}: replicas must be 1 (one process per sled store)")
        if s.get("podManagementPolicy") != "OrderedReady":
            fail(f"{wname}: podManagementPolicy must be OrderedReady")
        if s.get("updateStrategy", {}).get("type", "RollingUpdate") != "RollingUpdate" or "maxUnavailable" in s.get("updateStrategy", {}).get("rollingUpdate", {}):
            fail(f"{wname}: updateStrategy must be a plain RollingUpdate (stop, then start)")
        if s.get("serviceName") not in services or services[s["serviceName"]]["spec"].get("clusterIP") != "None":
            fail(f"{wname}: serviceName should name a headless Service of the overlay")
        templates = {t["metadata"]["name"]: t for t in s.get("volumeClaimTemplates", [])}
        store_path = env.get("REFUND_WORKER__STORE__PATH", "")
        on_claim = [m for m in c.get("volumeMounts", []) if m["name"] in templates and store_path.startswith(m["mountPath"].rstrip("/") + "/")]
        if not on_claim:
            fail(f"{wname}: store.path {store_path!r} is not on a volumeClaimTemplate's volume")
        for t in templates.values():
            modes = t["spec"].get("accessModes", [])
            if not modes or not set(modes) <= {"ReadWriteOncePod", "ReadWriteOnce"}:
                fail(f"{wname}: claim {t['metadata']['name']} must be single-writer (ReadWriteOncePod), is {modes}")
        if s.get("persistentVolumeClaimRetentionPolicy", {}).get("whenDeleted") != "Retain":
            fail(f"{wname}: the store's claim must be retained when the StatefulSet is deleted")
    else:
        if backend != "postgres":
            fail(f"{wname}: a Deployment runs replicas, which need store.backend=postgres (is {backend})")
        if "REFUND_WORKER__STORE__POSTGRES__URL_FILE" not in env:
            fail(f"{wname}: the database URL should come from REFUND_WORKER__STORE__POSTGRES__URL_FILE")
        strategy = workload["spec"].get("strategy", {})
        if strategy.get("rollingUpdate", {}).get("maxUnavailable") not in (0, "0", "0%"):
            fail(f"{wname}: a rolling update should not take a replica away before its successor is ready (maxUnavailable 0)")
    print(f"{where}: {len(objects)} objects hold together ({workload['kind']}, store.backend={backend}, grace {grace} s > preStop {pre_stop} s + drain {DRAIN} s)")


for overlay in ("single-node", "replicas"):
    check_overlay(overlay)


# --------------------------------------------------------------------------
# 3./4. docker-compose.yml and the Dockerfile.

compose_path = os.path.join(ROOT, "docker-compose.yml")
compose = yaml.safe_load(open(compose_path))
rabbit_tags = set()
for sname, svc in compose.get("services", {}).items():
    where = f"docker-compose.yml: service {sname}"
    if "cluster" in svc.get("profiles", []):
        fail(f"{where}: the cluster profile (retired stream cluster mode) is still there")
    env_block = svc.get("environment", {}) or {}
    names = env_block.keys() if isinstance(env_block, dict) else [e.split("=", 1)[0] for e in env_block]
    for n in names:
        check_env_name(n, where)
    image = svc.get("image", "")
    build = svc.get("build")
    if image and not build:
        if not re.search(r":\d+\.\d+(\.\d+)?(-[\w.]+)?$", image):
            fail(f"{where}: image {image} is not pinned to an exact version")
        if image.startswith("rabbitmq:"):
            rabbit_tags.add(image)
    if build and isinstance(build, dict) and build.get("target") == "runtime":
        grace = duration_seconds(svc.get("stop_grace_period", "10s"))
        if grace <= DRAIN:
            fail(f"{where}: stop_grace_period {svc.get('stop_grace_period', '10s (default)')} is not longer than the drain ({DRAIN} s)")
        test = svc.get("healthcheck", {}).get("test", [])
        if "curl" in " ".join(map(str, test)) or (test and test[0] == "CMD-SHELL"):
            fail(f"{where}: the health check should run `refund-worker health` without a shell or curl")
if len(rabbit_tags) != 1:
    fail(f"docker-compose.yml: expected one RabbitMQ image version, found {sorted(rabbit_tags)}")
print(f"docker-compose.yml: {len(compose.get('services', {}))} services; RabbitMQ {', '.join(sorted(rabbit_tags))}; stop grace > {DRAIN} s drain; every REFUND_WORKER__ key known")

dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
instructions = re.sub(r"\\\n", " ", re.sub(r"(?m)^\s*#.*\n", "", dockerfile))
for m in re.finditer(r"(?m)^FROM\s+(\S+)", instructions):
    image = m.group(1)
    stages = re.findall(r"(?mi)^FROM\s+\S+\s+AS\s+(\S+)", instructions)
    if image not in stages and not re.search(r":\d+\.\d+(\.\d+)?(-[\w.]+)?$", image):
        fail(f"Dockerfile: base image {image} is not pinned to an exact version")
if re.search(r"\bcurl\b", instructions):
    fail("Dockerfile: curl is installed")
users = re.findall(r"(?m)^USER\s+(\S+)", instructions)
if not users or any(not re.fullmatch(r"[1-9]\d*(:\d+)?", u) for u in users):
    fail(f"Dockerfile: USER should be a numeric non-root uid, is {users}")
if '["/usr/local/bin/refund-worker", "health"]' not in instructions or not re.search(r"(?m)^HEALTHCHECK\b.*CMD\s+\[", instructions):
    fail("Dockerfile: HEALTHCHECK should run [\"/usr/local/bin/refund-worker\", \"health\"] (exec form)")
if not re.search(r'(?m)^VOLUME\s+\["/var/lib/refund-worker"\]', instructions):
    fail("Dockerfile: VOLUME /var/lib/refund-worker missing")
store = re.search(r"REFUND_WORKER__STORE__PATH=(\S+)", instructions)
if not store or not store.group(1).startswith("/var/lib/refund-worker/"):
    fail("Dockerfile: REFUND_WORKER__STORE__PATH should point into the volume")
if "--package refund-worker --bin refund-worker" not in instructions:
    fail("Dockerfile: the product stage should build only --package refund-worker --bin refund-worker")
for name in re.findall(r"\b(REFUND_WORKER__[A-Z0-9_]+)=", instructions):
    check_env_name(name, "Dockerfile")
print("Dockerfile: pinned bases, numeric non-root user, exec-form health check, store in the volume, product binary only")


# --------------------------------------------------------------------------
# 5. Metric names.

metrics_src = open(os.path.join(ROOT, "src", "observability", "metrics.rs"), encoding="utf-8").read()
exported = {}
for kind, name in re.findall(r'\b(counter|gauge|histogram)!\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', metrics_src):
    exported[name] = kind
if not exported:
    fail("src/observability/metrics.rs: no metric found (counter!/gauge!/histogram! with a literal name)")
series_names = {}
for name, kind in exported.items():
    if kind == "histogram":
        for suffix in HISTOGRAM_SUFFIXES:
            series_names[name + suffix] = name
    else:
        series_names[name] = name

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                "and", "or", "unless", "atan2", "inf", "nan", "Inf", "NaN"}


def promql_metric_names(expr):
    """Metric names in a PromQL expression (also Grafana's label_values())."""
    names = set()
    for m in re.finditer(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)?\s*(\{[^}]*\})?\s*,", expr):
        if m.group(1):
            names.add(m.group(1))
    expr = re.sub(r"label_values\([^)]*\)", " ", expr)
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"'(?:\\.|[^'\\])*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[m.start() - 1] if m.start() > 0 else " "
        if before.isdigit() or before in "$.":
            continue
        word = m.group(0)
        if word in PROMQL_WORDS:
            continue
        after = s[m.end() :].lstrip()
        if after.startswith("("):
            continue  # a function or an aggregation
        names.add(word)
    return names


rules_path = os.path.join(ROOT, "deploy", "monitoring", "refund-worker.rules.yml")
dashboard_path = os.path.join(ROOT, "deploy", "monitoring", "refund-worker-dashboard.json")
used = {}
rules = yaml.safe_load(open(rules_path))
alerts = []
for group in rules.get("groups", []):
    for rule in group.get("rules", []):
        if "alert" in rule:
            alerts.append(rule)
        for n in promql_metric_names(rule["expr"]):
            used.setdefault(n, set()).add(f"rule {rule.get('alert') or rule.get('record')}")
try:
    dashboard = json.load(open(dashboard_path))
except ValueError as e:
    fail(f"{rel(dashboard_path)}: not JSON: {e}")
    dashboard = {}


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


panel_count = 0
for panel in walk_panels(dashboard.get("panels", [])):
    if panel.get("type") != "row":
        panel_count += 1
    for t in panel.get("targets", []):
        for n in promql_metric_names(t.get("expr", "")):
            used.setdefault(n, set()).add(f"panel {panel.get('title')!r}")
for var in dashboard.get("templating", {}).get("list", []):
    q = var.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    if var.get("type") == "query":
        for n in promql_metric_names(q):
            used.setdefault(n, set()).add(f"variable ${var.get('name')}")

families = set()
for name, where in sorted(used.items()):
    if name in PROMETHEUS_SYNTHETIC:
        continue
    if name in series_names:
        families.add(series_names[name])
    elif exported.get(name) == "histogram":
        fail(f"{name} (used by {', '.join(sorted(where))}) is a histogram: query {name}_bucket, _sum or _count")
    else:
        fail(f"{name} (used by {', '.join(sorted(where))}) is not exported by src/observability/metrics.rs")
print(f"metrics: {len(used)} names in {len(alerts)} alert rules and {panel_count} dashboard panels, all exported by src/observability/metrics.rs or recorded by Prometheus ({', '.join(sorted(PROMETHEUS_SYNTHETIC & set(used)))})")

names_path = os.path.join(ROOT, "deploy", "monitoring", "metric-names.txt")
wanted = "".join(f"{n}\n" for n in sorted(families))
current = open(names_path).read() if os.path.exists(names_path) else None
if current != wanted:
    if WRITE_METRIC_NAMES:
        with open(names_path, "w") as f:
            f.write(wanted)
        notes.append(f"{rel(names_path)}: written ({len(families)} names)")
    else:
        fail(f"{rel(names_path)} is not up to date: run scripts/check-deploy outside CI to rewrite it")
else:
    notes.append(f"{rel(names_path)}: up to date ({len(families)} names)")


# --------------------------------------------------------------------------
# 6. Runbooks.


def github_anchor(heading):
    anchor = heading.strip().lower()
    anchor = re.sub(r"[^\w\- ]", "", anchor)
    return anchor.replace(" ", "-")


def anchors_under_alerts(path):
    if not os.path.exists(path):
        return None
    text = open(path, encoding="utf-8").read()
    m = re.search(r"(?m)^## Alerts\s*$", text)
    if not m:
        return None
    section = text[m.end() :]
    end = re.search(r"(?m)^## ", section)
    section = section[: end.start()] if end else section
    return {github_anchor(h) for h in re.findall(r"(?m)^### (.+)$", section)}


# docs/operations.md once its `## Alerts` section has its headings; until
# then (no section, or an empty one waiting to be filled) the sections
# written for it in deploy/OPERATIONS-SECTIONS.md.
docs_anchors = anchors_under_alerts(os.path.join(ROOT, "docs", "operations.md"))
sections_anchors = anchors_under_alerts(os.path.join(ROOT, "deploy", "OPERATIONS-SECTIONS.md"))
if docs_anchors:
    runbook_source, anchors = "docs/operations.md", docs_anchors
else:
    runbook_source, anchors = "deploy/OPERATIONS-SECTIONS.md", sections_anchors
    if os.path.exists(os.path.join(ROOT, "docs", "operations.md")):
        notes.append("docs/operations.md has no alert headings yet: runbook anchors checked in deploy/OPERATIONS-SECTIONS.md")
if anchors is None:
    fail("no `## Alerts` section in docs/operations.md or deploy/OPERATIONS-SECTIONS.md for the runbook links")
    anchors = set()
for rule in alerts:
    ann = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        if not ann.get(key):
            fail(f"alert {rule['alert']}: annotation {key} missing")
    url = ann.get("runbook_url", "")
    want = f"docs/operations.md#{github_anchor(rule['alert'])}"
    if url != want:
        fail(f"alert {rule['alert']}: runbook_url {url!r}, expected {want!r}")
    elif github_anchor(rule["alert"]) not in anchors:
        fail(f"alert {rule['alert']}: no `### {rule['alert']}` under `## Alerts` in {runbook_source}")
# Every alert has a unit test that fires it and one that expects it quiet.
tests_path = os.path.join(ROOT, "deploy", "monitoring", "refund-worker.rules.test.yml")
fires, quiet = set(), set()
for test in yaml.safe_load(open(tests_path)).get("tests", []):
    for case in test.get("alert_rule_test", []):
        (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
for rule in alerts:
    if rule["alert"] not in fires:
        fail(f"alert {rule['alert']}: no unit test in {rel(tests_path)} fires it")
    if rule["alert"] not in quiet:
        fail(f"alert {rule['alert']}: no unit test in {rel(tests_path)} checks it stays quiet")
print(f"rule tests: each of the {len(alerts)} alerts fired by a test and kept quiet by another")
print(f"runbooks: {len(alerts)} alerts, each with summary, description and a runbook_url whose heading is in {runbook_source}")

for note in notes:
    print(note)
if errors:
    print(f"\n{len(errors)} problem(s):", file=sys.stderr)
    for e in errors:
        print(f"  - {e}", file=sys.stderr)
    sys.exit(1)
