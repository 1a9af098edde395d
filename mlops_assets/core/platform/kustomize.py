"""A small kustomize: exactly the features `k8s/` uses (resources, labels, namespace,
configMapGenerator without hashes, strategic-merge patches), and a `KustomizeError` for anything else.

The platform assets render `k8s/overlays/<env>` with it on a cluster (no `kubectl` or `kustomize`
binary in the user-code image), and the offline manifest tests render every kustomization with it;
where `kubectl` is on PATH, the tests check that `kubectl kustomize` produces the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


SUPPORTED_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "labels",
    "namespace",
    "generatorOptions",
    "configMapGenerator",
    "patches",
}
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume"}
# Strategic-merge keys of the built-in list fields our patches may touch; other lists are replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath"}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not implement, or is inconsistent."""


def resource_id(doc: dict) -> tuple[str, str, str, str]:
    meta = doc.get("metadata") or {}
    return (doc.get("apiVersion", ""), doc.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))


def _is_builtin(api_version: str) -> bool:
    group = api_version.split("/")[0] if "/" in api_version else ""
    return "." not in group or group.endswith(".k8s.io")


def strategic_merge(base, patch, builtin: bool):
    """Strategic merge for built-in kinds (lists keyed by MERGE_KEYS), JSON merge patch otherwise."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if isinstance(key, str) and key.startswith("$"):
                raise KustomizeError(f"patch directive {key} is not supported by this renderer")
            if value is None:
                out.pop(key, None)
            elif key in out and builtin and key in MERGE_KEYS and isinstance(value, list):
                out[key] = _merge_list(out[key], value, MERGE_KEYS[key])
            elif key in out:
                out[key] = strategic_merge(out[key], value, builtin)
            else:
                out[key] = copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def _merge_list(base: list, patch: list, key: str) -> list:
    out = [copy.deepcopy(item) for item in base]
    for item in patch:
        for i, existing in enumerate(out):
            if existing.get(key) == item.get(key):
                out[i] = strategic_merge(existing, item, True)
                break
        else:
            out.append(copy.deepcopy(item))
    return out


def render(directory: Path) -> list[dict]:
    """Render one kustomization directory into its list of objects."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KUSTOMIZATION_KEYS
    if unsupported:
        raise KustomizeError(f"{directory}: unsupported kustomization fields {sorted(unsupported)}")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs.extend(render(path))
        elif path.is_file():
            docs.extend(load_yaml_docs(path))
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")

    options = kustomization.get("generatorOptions") or {}
    if set(options) - {"disableNameSuffixHash"}:
        raise KustomizeError(f"{directory}: unsupported generatorOptions {sorted(options)}")
    for generator in kustomization.get("configMapGenerator", []):
        if not options.get("disableNameSuffixHash"):
            raise KustomizeError(f"{directory}: name-suffix hashes are not implemented; disable them")
        if set(generator) - {"name", "namespace", "files", "literals"}:
            raise KustomizeError(f"{directory}: unsupported configMapGenerator fields {sorted(generator)}")
        data: dict[str, str] = {}
        for item in generator.get("files", []):
            key, _, source = item.partition("=") if "=" in item else (Path(item).name, "", item)
            source_path = (directory / source).resolve()
            if directory.resolve() not in source_path.parents:
                raise KustomizeError(f"{directory}: {item} is outside the kustomization root")
            data[key] = source_path.read_text()
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        metadata = {"name": generator["name"]}
        if generator.get("namespace"):
            metadata["namespace"] = generator["namespace"]
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})

    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{directory}: only `patches: - path:` (strategic merge) is supported")
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        target = resource_id(patch)
        matches = [i for i, doc in enumerate(docs) if resource_id(doc) == target]
        if len(matches) != 1:
            raise KustomizeError(f"{directory}: patch {patch_entry['path']} matches {len(matches)} objects ({target})")
        docs[matches[0]] = strategic_merge(docs[matches[0]], patch, _is_builtin(patch["apiVersion"]))

    if kustomization.get("namespace"):
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED_KINDS:
                doc["metadata"]["namespace"] = kustomization["namespace"]

    for entry in kustomization.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeError(f"{directory}: labels with includeSelectors/includeTemplates are not implemented")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(entry["pairs"])

    seen: set = set()
    for doc in docs:
        rid = resource_id(doc)
        if rid in seen:
            raise KustomizeError(f"{directory}: {rid} is defined twice")
        seen.add(rid)
    return docs
