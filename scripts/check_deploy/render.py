"""Render a kustomization: kubectl kustomize when installed, checked against kustomize_lite."""

import json
import subprocess

import yaml

import kustomize_lite


def object_id(o):
    m = o["metadata"]
    return f"{o['kind']}/{m['name']}" + (f" (ns {m['namespace']})" if m.get("namespace") else "")


def render(directory, kubectl, name, report):
    """The objects of `directory`, or None (and a failure reported)."""
    try:
        lite = kustomize_lite.render(directory)
    except (kustomize_lite.KustomizeError, OSError, KeyError) as e:
        report.fail(f"{name}: kustomize_lite: {e}")
        return None
    if not kubectl:
        report.ok(f"{name}: {len(lite)} objects")
        return lite
    run = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True,
                         timeout=120)
    if run.returncode != 0:
        report.fail(f"{name}: kubectl kustomize: {run.stderr.strip()}")
        return None
    objects = [d for d in yaml.safe_load_all(run.stdout) if d is not None]
    a, b = _canonical(objects), _canonical(lite)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    report.check(not differ, f"{name}: {len(objects)} objects, kustomize_lite renders the same",
                 f"kustomize_lite differs on {differ}")
    return objects


def _canonical(objects):
    return {object_id(o): json.dumps(o, sort_keys=True) for o in objects}
