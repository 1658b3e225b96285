"""The gateway's pod as the rendered objects describe it: its container, its volumes and what
they hold, the config file it reads, and the paths that config names."""

import base64
import os
import re

import yaml

APP = "infergate"
# The image's WORKDIR (Dockerfile), where relative config paths land.
IMAGE_WORKDIR = "/var/lib/infergate"


def find(objects, kind, name=None):
    return [o for o in objects
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def gateway(objects):
    """(Deployment, container) of the gateway, or (None, None)."""
    deployments = find(objects, "Deployment", APP)
    if len(deployments) != 1:
        return None, None
    containers = [c for c in deployments[0]["spec"]["template"]["spec"]["containers"]
                  if c["name"] == APP]
    return deployments[0], (containers[0] if containers else None)


def workdir(container):
    return container.get("workingDir", IMAGE_WORKDIR)


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_files(objects, deployment, container):
    """mountPath -> (volume kind, {file name: bytes} or None, writable, the volumeMount)."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {}
    for m in container.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        if "configMap" in v:
            cm = find(objects, "ConfigMap", v["configMap"]["name"])
            data = cm[0].get("data", {}) if cm else {}
            mounts[m["mountPath"]] = ("configMap", {k: s.encode() for k, s in data.items()}, False, m)
        elif "secret" in v:
            files = {}
            for secret in find(objects, "Secret", v["secret"]["secretName"]):
                files.update({k: base64.b64decode(s) for k, s in secret.get("data", {}).items()})
                files.update({k: s.encode() for k, s in secret.get("stringData", {}).items()})
            mounts[m["mountPath"]] = ("secret", files, False, m)
        elif "emptyDir" in v:
            mounts[m["mountPath"]] = ("emptyDir", None, not m.get("readOnly"), m)
        else:
            mounts[m["mountPath"]] = ("other", None, False, m)
    return mounts


def mount_of(mount_paths, path):
    """The mount path that holds `path` (the deepest), or None."""
    best = None
    for mount_path in mount_paths:
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            if best is None or len(mount_path) > len(best):
                best = mount_path
    return best


def config_path(container):
    cmd = container.get("command", []) + container.get("args", [])
    for flag in ("--config", "-c"):
        if flag in cmd and cmd.index(flag) + 1 < len(cmd):
            return cmd[cmd.index(flag) + 1]
    return None


def load_config(objects, deployment, container):
    """(mounts, --config path, config text, parsed config); text and config None when the
    path is not a key of a mounted ConfigMap or Secret."""
    mounts = pod_files(objects, deployment, container)
    path = config_path(container)
    mount = mount_of(mounts, path) if path else None
    if not mount or mounts[mount][1] is None:
        return mounts, path, None, None
    content = mounts[mount][1].get(os.path.relpath(path, mount))
    text = content.decode() if content is not None else None
    return mounts, path, text, (yaml.safe_load(text) if text is not None else None)


def config_files(config):
    """(YAML key path, path, is a directory the gateway writes) for every path the config names."""
    out = []
    for i, f in enumerate(config.get("filters") or []):
        for fname, body in (f or {}).items():
            body = body or {}
            at = f"filters[{i}].{fname}"
            for key in ("api_keys_file", "users_file"):
                if body.get(key):
                    out.append((f"{at}.{key}", body[key], False))
            for key in ("secret_file", "public_key_file", "private_key_file"):
                if (body.get("jwt") or {}).get(key):
                    out.append((f"{at}.jwt.{key}", body["jwt"][key], False))
            if body.get("data_dir"):
                out.append((f"{at}.data_dir", body["data_dir"], True))
            for key in ("url_file", "password_file"):
                if (body.get("store") or {}).get(key):
                    out.append((f"{at}.store.{key}", body["store"][key], False))
    log = config.get("access_log") or {}
    if log.get("output") == "file" and log.get("path"):
        out.append(("access_log.path", os.path.dirname(log["path"]), True))
    if config.get("engines"):
        out.append(("engines.log_dir", (config["engines"] or {}).get("log_dir", "logs/engines"), True))
    return out


def duration_s(text, default):
    """Seconds in a config duration ("250ms", "5s", "1m30s")."""
    if text is None:
        return default
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", str(text)))
