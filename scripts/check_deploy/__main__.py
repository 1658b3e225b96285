"""Check deploy/ and the Dockerfile without a cluster (scripts/check-deploy.sh runs this:
`python scripts/check_deploy --binary target/release/infergate`).

For the base, the base with each component, and overlays/example:
  1. render: `kubectl kustomize` when kubectl is here (and kustomize_lite must render the same
     objects), else kustomize_lite alone (render.py, kustomize_lite.py);
  2. validate every object against the Kubernetes OpenAPI schemas, strict (schemas.py);
  3. check the wiring the schemas cannot see: selectors, port names, probes, hardening, the
     image, the config and secret mounts, the files the config names, shutdown timing (wiring.py);
  4. run `infergate --check` on each gateway config in a stand-in of the pod's files (below).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

from pod import gateway, load_config, mount_of, workdir
from render import render
from report import Report
from schemas import K8S_VERSIONS, validate_schemas
from wiring import check_wiring

COMPONENTS = ["hpa", "servicemonitor", "redis"]
# What a binary that predates `limits.store` (issue #16) says about the redis component's config.
NO_STORE_YET = "limits.store: unknown field `store`"


def main():
    args = parse_args()
    report = Report()
    deploy = os.path.join(args.repo, "deploy")
    kubectl = None if args.no_kubectl else shutil.which("kubectl")
    with tempfile.TemporaryDirectory(prefix="check-deploy-") as tmp:
        targets = [("base", os.path.join(deploy, "base"))]
        targets += [(f"base + components/{c}", base_with(tmp, deploy, c)) for c in COMPONENTS]
        targets.append(("overlays/example", os.path.join(deploy, "overlays", "example")))

        print("rendering with " + ("kubectl kustomize (and kustomize_lite, compared)" if kubectl
                                   else "kustomize_lite (no kubectl here)"))
        rendered = {}
        for name, directory in targets:
            objects = render(directory, kubectl, name, report)
            if objects is not None:
                rendered[name] = objects

        print(f"schemas: kubernetes-validate {kubernetes_validate.__version__}, strict, "
              f"Kubernetes {' and '.join(K8S_VERSIONS)}")
        validate_schemas(rendered, report)

        print("wiring")
        for name, objects in rendered.items():
            check_wiring(name, objects, args.repo, report)

        print("gateway config (infergate --check in a stand-in of the pod's files)")
        checked = {}
        for name, objects in rendered.items():
            check_gateway_config(name, objects, args.binary, tmp, checked, report)
        if "base" in rendered and "base + components/redis" in rendered:
            check_redis_config_drift(rendered["base"], rendered["base + components/redis"], report)

    print(report.summary())
    return 1 if report.failed else 0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(here)))
    p.add_argument("--binary", required=True, help="target/release/infergate")
    p.add_argument("--no-kubectl", action="store_true", help="render with kustomize_lite only")
    return p.parse_args()


def base_with(tmp, deploy, component):
    """A kustomization of the base plus one component."""
    directory = os.path.join(tmp, "with-" + component)
    os.makedirs(directory)
    with open(os.path.join(directory, "kustomization.yaml"), "w") as f:
        yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(os.path.join(deploy, "base"), directory)],
            "components": [os.path.relpath(os.path.join(deploy, "components", component), directory)],
        }, f)
    return directory


def check_gateway_config(name, objects, binary, tmp, checked, report):
    """`infergate --check` on the config the pod reads, with the pod's volumes written under a
    temporary root (ConfigMap and Secret keys as files, emptyDirs empty), the config's paths
    moved there, and engine host names that resolve only in the cluster replaced by loopback
    addresses (the gateway resolves backends when it loads a config)."""
    deployment, container = gateway(objects)
    if container is None:
        return
    mounts, path, text, config = load_config(objects, deployment, container)
    if config is None:
        return
    secrets = {m: sorted((k, v.decode(errors="replace")) for k, v in f.items())
               for m, (kind, f, _, _) in mounts.items() if kind == "secret"}
    key = json.dumps([text, secrets], sort_keys=True)
    if key in checked:
        outcome, first = checked[key]
        {"ok": report.ok, "skip": report.skip, "fail": report.fail}[outcome](
            f"{name}: the same config and secrets as {first}: {outcome}")
        return
    checked[key] = ("fail", name)

    root = tempfile.mkdtemp(prefix="pod-", dir=tmp)
    for mount_path, (_, files, _, _) in mounts.items():
        os.makedirs(root + mount_path, exist_ok=True)
        for fname, content in (files or {}).items():
            with open(os.path.join(root + mount_path, fname), "wb") as f:
                f.write(content)
    config = relocate(config, sorted(mounts, key=len, reverse=True), root)
    standins = []
    for pool in config.get("pools") or []:
        pool["backends"] = [standin_backend(b, standins) for b in pool.get("backends") or []]
    for original, standin in standins:
        print(f"        stand-in: backend {original} -> {standin} (resolves only in the cluster)")
    file = os.path.join(root, "infergate.yaml")
    with open(file, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    cwd = root + workdir(container)
    os.makedirs(cwd, exist_ok=True)
    run = subprocess.run([os.path.abspath(binary), "--check", "--config", file],
                         capture_output=True, text=True, timeout=60, cwd=cwd)
    out = (run.stdout + run.stderr).strip()
    if run.returncode != 0 and NO_STORE_YET in out and all(
            "store" in line for line in out.splitlines()[1:] if line.strip()):
        report.skip(f"{name}: {path}: this infergate binary predates limits.store (issue #16); "
                    "rebuild it to check this config")
        checked[key] = ("skip", name)
        return
    if report.check(run.returncode == 0, f"{name}: infergate --check {path}: valid",
                    out.replace("\n", " | ")):
        checked[key] = ("ok", name)


def relocate(value, mount_paths, root):
    """`value` with every in-pod path moved under `root`."""
    if isinstance(value, dict):
        return {k: relocate(v, mount_paths, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, mount_paths, root) for v in value]
    if isinstance(value, str) and mount_of(mount_paths, value):
        return root + value
    return value


def standin_backend(backend, standins):
    address = backend["address"] if isinstance(backend, dict) else backend
    host, _, port = address.rpartition(":")
    try:
        socket.getaddrinfo(host, int(port))
        return backend
    except (socket.gaierror, ValueError):
        standin = f"127.0.0.{len(standins) + 2}:{port}"
        standins.append((address, standin))
        return dict(backend, address=standin) if isinstance(backend, dict) else standin


def check_redis_config_drift(base, redis, report):
    """The redis component repeats the whole gateway config: it must be the base's plus `store`."""
    configs = [load_config(objects, *gateway(objects))[3] for objects in (base, redis)]
    if None in configs:
        report.fail("components/redis: cannot read both gateway configs")
        return
    added = [f["limits"].pop("store") for f in configs[1].get("filters") or []
             if isinstance((f or {}).get("limits"), dict) and "store" in f["limits"]]
    report.check(len(added) == 1 and (added[0] or {}).get("kind") == "redis" and configs[0] == configs[1],
                 "components/redis: its gateway config is the base's plus limits.store (kind: redis) only",
                 "the two configs differ elsewhere: change both, or regenerate the patch from the base")


if __name__ == "__main__":
    sys.exit(main())
