"""Every object against the Kubernetes OpenAPI schemas (kubernetes-validate, strict)."""

import json
import re

import kubernetes_validate

from render import object_id

# The oldest Kubernetes still commonly run, and the newest the package knows.
K8S_VERSIONS = ["1.29", kubernetes_validate.latest_version()]


def validate_schemas(rendered, report):
    """Each distinct object once (the same object in several renders is checked once)."""
    seen = set()
    for name, objects in rendered.items():
        for o in objects:
            key = json.dumps(o, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            what = f"{object_id(o)} ({name})"
            if o["apiVersion"].startswith("monitoring.coreos.com/"):
                check_service_monitor_shape(o, what, report)
                continue
            errors = []
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(o, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(str(p) for p in e.path)
                    errors.append(f"{version}: {path}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    errors.append(e.message)
            report.check(not errors, what, "; ".join(errors))


def check_service_monitor_shape(o, what, report):
    """ServiceMonitor's CRD is not in the core schemas: check the fields deploy/ uses."""
    spec = o.get("spec", {})
    allowed = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
               "podTargetLabels"}
    endpoint_keys = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                     "relabelings", "metricRelabelings"}
    problems = [f"unknown spec.{k}" for k in spec if k not in allowed]
    if not spec.get("selector", {}).get("matchLabels"):
        problems.append("spec.selector.matchLabels is empty")
    endpoints = spec.get("endpoints") or []
    if not endpoints:
        problems.append("no spec.endpoints")
    for i, e in enumerate(endpoints):
        problems += [f"unknown spec.endpoints[{i}].{k}" for k in e if k not in endpoint_keys]
        if not isinstance(e.get("port"), str):
            problems.append(f"spec.endpoints[{i}].port must name a Service port")
        for k in ("interval", "scrapeTimeout"):
            if k in e and not re.fullmatch(r"(\d+(ms|s|m|h))+", str(e[k])):
                problems.append(f"spec.endpoints[{i}].{k}: not a Prometheus duration")
    report.check(o["apiVersion"] == "monitoring.coreos.com/v1" and not problems,
                 f"{what}: CRD, not in the core schemas: structural check", "; ".join(problems))
