"""The part of kustomize that deploy/ uses, for machines without kubectl.

scripts/check_deploy renders with `kubectl kustomize` when kubectl is installed and
then also renders with this and requires the same objects, so this cannot drift from
kustomize unnoticed. It knows `resources` (files and directories), `components`,
`patches` (strategic merge, or JSON 6902 with a `target`), `namespace` and `images`;
any other kustomization key is an error, not silently ignored.
"""

import copy
import os

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "namespace", "images"}

# Strategic-merge lists merged item by item (the patchMergeKey of the Kubernetes API);
# every other list in a patch replaces the list it patches, as in kustomize.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}

# Kinds a namespace transformer leaves alone (cluster-scoped) among those deploy/ uses.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class KustomizeError(Exception):
    pass


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def read_kustomization(directory):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path) as f:
                k = yaml.safe_load(f) or {}
            unknown = set(k) - KNOWN_KEYS
            if unknown:
                raise KustomizeError(
                    f"{path}: {sorted(unknown)} not supported by kustomize_lite; "
                    "install kubectl, or teach scripts/check_deploy/kustomize_lite.py")
            return k
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def render(directory):
    """The objects `kubectl kustomize DIRECTORY` prints, as a list of dicts."""
    return _build(os.path.abspath(directory), [], component=False)


def _build(directory, objects, component):
    k = read_kustomization(directory)
    is_component = k.get("kind") == "Component"
    if is_component != component:
        raise KustomizeError(f"{directory}: kind {k.get('kind')} used as a "
                             f"{'component' if component else 'resource'}")
    objects = objects if component else []
    for entry in k.get("resources", []):
        path = os.path.join(directory, entry)
        if os.path.isdir(path):
            objects.extend(_build(path, [], component=False))
        else:
            objects.extend(load_docs(path))
    for entry in k.get("components", []):
        objects = _build(os.path.join(directory, entry), objects, component=True)
    for patch in k.get("patches", []):
        _apply_patch(directory, patch, objects)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = k["namespace"]
    for image in k.get("images", []):
        _set_image(objects, image)
    return objects


def _apply_patch(directory, patch, objects):
    if "path" not in patch:
        raise KustomizeError(f"{directory}: only `patches: - path:` is supported")
    body = load_docs(os.path.join(directory, patch["path"]))
    if len(body) == 1 and isinstance(body[0], list):
        target = patch.get("target")
        if not target:
            raise KustomizeError(f"{patch['path']}: a JSON 6902 patch needs a target")
        hits = [o for o in objects if _matches(o, target)]
        if not hits:
            raise KustomizeError(f"{patch['path']}: no object matches {target}")
        for obj in hits:
            for op in body[0]:
                _json6902(obj, op)
        return
    for smp in body:
        target = patch.get("target") or {"kind": smp["kind"], "name": smp["metadata"]["name"]}
        hits = [o for o in objects if _matches(o, target)]
        if not hits:
            raise KustomizeError(f"{patch['path']}: no object matches {target}")
        for obj in hits:
            merged = _merge(obj, smp)
            obj.clear()
            obj.update(merged)


def _matches(obj, target):
    group, _, version = obj["apiVersion"].rpartition("/")
    checks = {
        "group": group,
        "version": version,
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"].get("namespace"),
    }
    return all(checks[key] == value for key, value in target.items() if key in checks)


def _merge(base, patch):
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key.startswith("$"):
            raise KustomizeError(f"strategic-merge directive {key} not supported")
        if value is None:
            out.pop(key, None)
        elif key in MERGE_KEYS and isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = _merge_list(out[key], value, MERGE_KEYS[key])
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _merge_list(base, patch, key):
    out = [copy.deepcopy(item) for item in base]
    for item in patch:
        same = [i for i, b in enumerate(out) if b.get(key) == item.get(key)]
        if same:
            out[same[0]] = _merge(out[same[0]], item)
        else:
            out.append(copy.deepcopy(item))
    return out


def _json6902(obj, op):
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if op["op"] == "remove":
        if isinstance(parent, list):
            del parent[int(last)]
        else:
            del parent[last]
    elif op["op"] in ("add", "replace"):
        if isinstance(parent, list):
            if last == "-":
                parent.append(op["value"])
            elif op["op"] == "add":
                parent.insert(int(last), op["value"])
            else:
                parent[int(last)] = op["value"]
        else:
            if op["op"] == "replace" and last not in parent:
                raise KustomizeError(f"replace: {op['path']} does not exist")
            parent[last] = op["value"]
    else:
        raise KustomizeError(f"JSON 6902 op {op['op']} not supported")


def _set_image(objects, image):
    for obj in objects:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            name, tag = _split_image(container["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            tag = image.get("newTag", tag)
            container["image"] = f"{name}:{tag}" if tag else name


def _split_image(ref):
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, None
