"""What the schemas cannot see: that the objects fit each other, the image and the gateway config."""

import json
import os
import re

from pod import (APP, config_files, duration_s, find, gateway, load_config, mount_of, selects,
                 workdir)


def check_wiring(name, objects, repo, report):
    deployment, container = gateway(objects)
    if not report.check(container is not None,
                        f"{name}: one Deployment `{APP}` with a container `{APP}`"):
        return
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    check_selectors(name, objects, deployment, ports, report)
    check_probes(name, container, ports, report)
    check_hardening(name, deployment, container, report)
    check_image(name, container, repo, report)
    check_mounts(name, objects, deployment, container, ports, report)


def check_selectors(name, objects, deployment, ports, report):
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    problems = []
    for svc in find(objects, "Service", APP):
        if not selects(svc["spec"].get("selector"), labels):
            problems.append(f"Service {APP} does not select the pods")
        problems += [f"Service port {p['name']} targets unknown container port {p['targetPort']}"
                     for p in svc["spec"]["ports"]
                     if isinstance(p.get("targetPort"), str) and p["targetPort"] not in ports]
    for pdb in find(objects, "PodDisruptionBudget"):
        if not selects(pdb["spec"]["selector"].get("matchLabels"), labels):
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']} does not select the pods")
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", APP):
            problems.append(f"HPA targets {ref['kind']}/{ref['name']}")
        if "replicas" in deployment["spec"]:
            problems.append("with an HPA the Deployment must not set replicas (each apply would reset it)")
    for sm in find(objects, "ServiceMonitor"):
        services = [s for s in find(objects, "Service")
                    if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        if not services:
            problems.append("the ServiceMonitor selects no Service")
        for e in sm["spec"]["endpoints"]:
            if not any(e["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in services):
                problems.append(f"ServiceMonitor port {e['port']} is not a port of the Services it selects")
    report.check(not problems, f"{name}: Service, PDB, HPA, ServiceMonitor match the pods and their ports",
                 "; ".join(problems))


def check_probes(name, container, ports, report):
    probes = {k: container.get(k, {}).get("httpGet", {}) for k in ("livenessProbe", "readinessProbe")}
    report.check(probes["livenessProbe"].get("path") == "/health/live"
                 and probes["readinessProbe"].get("path") == "/health/ready"
                 and all(p.get("port") in ports for p in probes.values()),
                 f"{name}: probes /health/live and /health/ready on named container ports", str(probes))


def check_hardening(name, deployment, container, report):
    ctx = container.get("securityContext", {})
    psc = deployment["spec"]["template"]["spec"].get("securityContext", {})
    seccomp = ctx.get("seccompProfile") or psc.get("seccompProfile", {})
    hardening = {
        "runAsNonRoot": ctx.get("runAsNonRoot") or psc.get("runAsNonRoot"),
        "numeric runAsUser": isinstance(ctx.get("runAsUser", psc.get("runAsUser")), int),
        "readOnlyRootFilesystem": ctx.get("readOnlyRootFilesystem"),
        "allowPrivilegeEscalation: false": ctx.get("allowPrivilegeEscalation") is False,
        "capabilities drop ALL": ctx.get("capabilities", {}).get("drop") == ["ALL"],
        "seccompProfile RuntimeDefault": seccomp.get("type") == "RuntimeDefault",
        "resources requests and limits": all(container.get("resources", {}).get(k)
                                             for k in ("requests", "limits")),
    }
    missing = [k for k, v in hardening.items() if not v]
    report.check(not missing, f"{name}: hardening ({', '.join(hardening)})", f"missing {missing}")


def check_image(name, container, repo, report):
    with open(os.path.join(repo, "Dockerfile")) as f:
        text = f.read()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    expose = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}
    user = re.search(r"^USER\s+(\S+)\s*$", text, re.M)
    problems = []
    if not entry or json.loads(entry.group(1)) != container.get("command"):
        problems.append(f"Deployment command {container.get('command')} is not the image's ENTRYPOINT")
    missing = {p["containerPort"] for p in container.get("ports", [])} - expose
    if missing:
        problems.append(f"ports {sorted(missing)} not EXPOSEd")
    if not user or not re.fullmatch(r"\d+(:\d+)?", user.group(1)):
        problems.append("USER must be numeric (runAsNonRoot can only verify a number)")
    report.check(not problems, f"{name}: Dockerfile ENTRYPOINT, EXPOSE, USER agree with the Deployment",
                 "; ".join(problems))


def check_mounts(name, objects, deployment, container, ports, report):
    mounts, path, _, config = load_config(objects, deployment, container)
    problems = [f"{mount_path} uses subPath: updates would never reach the pod"
                for mount_path, (kind, _, _, m) in mounts.items()
                if kind in ("configMap", "secret") and m.get("subPath")]
    if config is None:
        problems.append(f"--config {path} is not a file of a ConfigMap mounted as a directory")
    elif not (config.get("server") or {}).get("watch_config"):
        problems.append("server.watch_config is off: ConfigMap updates are not applied")
    if not report.check(not problems, f"{name}: ConfigMap {path} and Secret mounted as directories, "
                        "watch_config on", "; ".join(problems)) or config is None:
        return
    check_config_paths(name, config, mounts, container, report)
    check_ports_and_timing(name, config, deployment, container, ports, report)


def check_config_paths(name, config, mounts, container, report):
    """Files the config reads must be keys of the mounted volumes; directories it writes must be
    on a writable emptyDir (the root file system is read-only)."""
    problems = []
    for key, p, is_dir in config_files(config):
        p = p if os.path.isabs(p) else os.path.join(workdir(container), p)
        mount = mount_of(mounts, p)
        if mount is None:
            problems.append(f"{key}: {p} is on no volume (the root file system is read-only)")
            continue
        kind, files, writable, _ = mounts[mount]
        if is_dir and not writable:
            problems.append(f"{key}: {p} must be writable, but {mount} is a read-only {kind}")
        if not is_dir and files is not None and os.path.relpath(p, mount) not in files:
            problems.append(f"{key}: {p}: the {kind} mounted at {mount} has no key "
                            f"{os.path.relpath(p, mount)}")
    report.check(not problems, f"{name}: every file the config names is in the Secret/ConfigMap, "
                 "every directory it writes on an emptyDir", "; ".join(problems))


def check_ports_and_timing(name, config, deployment, container, ports, report):
    server = config.get("server") or {}
    problems = []
    for key, port_name in (("listen", "http"), ("metrics_listen", "metrics")):
        want = int(str(server.get(key, "")).rsplit(":", 1)[-1] or 0)
        if ports.get(port_name) != want:
            problems.append(f"server.{key} port {want} != container port {port_name} "
                            f"({ports.get(port_name)})")
    drain = duration_s(server.get("drain_delay"), 0) + duration_s(server.get("grace_period"), 30)
    prestop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if not grace > drain + prestop:
        problems.append(f"terminationGracePeriodSeconds {grace} <= drain_delay + grace_period "
                        f"+ preStop = {drain + prestop:g}")
    report.check(not problems, f"{name}: listen ports match the container ports; "
                 f"terminationGracePeriodSeconds {grace} > drain_delay + grace_period ({drain:g} s)",
                 "; ".join(problems))
