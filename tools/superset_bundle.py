"""Imports deploy/superset/bundle into Superset, packs it as a ZIP, and writes an export back.

  import BUNDLE           (with Superset's Python) imports every database, dataset, chart and
                          dashboard of the bundle, overwriting by uuid, so a re-import updates
                          them in place. `superset import-dashboards` would not: it overwrites
                          dashboards but keeps existing charts and datasets as they are.
  pack BUNDLE OUT.zip     the bundle as a ZIP for Superset's UI or CLI import
  unpack EXPORT.zip BUNDLE  an export (superset export-dashboards) as the bundle: the URL back to
                          its placeholder, and the ids this installation gave out set to 0, so the
                          files only change when a chart does (uuids are the stable references).

The database URL is filled in from $CDC_LAKE_ANALYTICS_URL (postgres://user@host:port/db). A
password, if the role needs one, is read from $CDC_LAKE_ANALYTICS_PASSWORD_FILE. It is handed to
Superset's importer directly, and never written into a file: a packed ZIP carries Superset's mask
(XXXXXXXXXX) instead, and the UI asks for the password when it imports the ZIP.
"""
import io
import json
import os
import re
import sys
import zipfile
from urllib.parse import quote, urlsplit

import yaml

TOP = "cdc_lake_dashboards"
URL_PLACEHOLDER = "{{ CDC_LAKE_ANALYTICS_URL }}"


MASK = "XXXXXXXXXX"


def analytics_password():
    path = os.environ.get("CDC_LAKE_ANALYTICS_PASSWORD_FILE")
    if not path:
        return urlsplit(os.environ["CDC_LAKE_ANALYTICS_URL"]).password
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def sqlalchemy_url() -> str:
    """The analytics target as a SQLAlchemy URL, its password (if any) masked."""
    url = urlsplit(os.environ["CDC_LAKE_ANALYTICS_URL"])
    if url.scheme not in ("postgres", "postgresql"):
        sys.exit(f"CDC_LAKE_ANALYTICS_URL must be a postgres:// URL, not {url.scheme}://")
    auth = quote(url.username or "postgres", safe="")
    if analytics_password():
        auth += ":" + MASK
    host = url.hostname or "127.0.0.1"
    port = url.port or 5432
    return f"postgresql+psycopg2://{auth}@{host}:{port}{url.path or '/postgres'}"


def filled(bundle: str) -> dict:
    """The bundle's files by path, with the database URL filled in."""
    url = sqlalchemy_url()
    contents = {}
    for root, _, files in os.walk(bundle):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, bundle)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if rel.startswith("databases/"):
                if URL_PLACEHOLDER not in text:
                    sys.exit(f"{rel}: no {URL_PLACEHOLDER} to fill in")
                text = text.replace(URL_PLACEHOLDER, url)
            contents[rel] = text
    return contents


def pack(bundle: str, out: str) -> None:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, text in filled(bundle).items():
            z.writestr(f"{TOP}/{rel}", text)


def import_bundle(bundle: str) -> None:
    contents = filled(bundle)
    # The same files as an "assets" import: that command overwrites every object by uuid.
    metadata = yaml.safe_load(contents["metadata.yaml"])
    metadata["type"] = "assets"
    contents["metadata.yaml"] = yaml.safe_dump(metadata)
    password = analytics_password()
    passwords = {rel: password for rel in contents if rel.startswith("databases/")} if password else {}

    from flask import g
    from superset.app import create_app

    app = create_app()
    with app.app_context(), app.test_request_context():
        from superset import security_manager
        from superset.commands.importers.v1.assets import ImportAssetsCommand

        g.user = security_manager.find_user(username="admin")
        ImportAssetsCommand(contents, passwords=passwords).run()
    kinds = {k: sum(1 for rel in contents if rel.startswith(k + "/")) for k in ("dashboards", "charts", "datasets")}
    print(f"imported {kinds['dashboards']} dashboards, {kinds['charts']} charts, {kinds['datasets']} datasets")


def stable(rel: str, doc: dict) -> dict:
    """The export without what differs between installations."""
    if rel.startswith("databases/"):
        doc["sqlalchemy_uri"] = URL_PLACEHOLDER
        doc.pop("password", None)
    elif rel.startswith("charts/"):
        params = doc.get("params") or {}
        params["datasource"] = "0__table"
        params.pop("slice_id", None)
        params.pop("dashboards", None)
        if doc.get("query_context"):
            qc = json.loads(doc["query_context"])
            qc["datasource"] = {"id": 0, "type": "table"}
            form = qc.get("form_data") or {}
            form["datasource"] = "0__table"
            form.pop("slice_id", None)
            form.pop("dashboards", None)
            for q in qc.get("queries", []):
                if "datasource" in q:
                    q["datasource"] = qc["datasource"]
            doc["query_context"] = json.dumps(qc, sort_keys=True)
    elif rel.startswith("dashboards/"):
        for node in (doc.get("position") or {}).values():
            if isinstance(node, dict) and "chartId" in node.get("meta", {}):
                node["meta"]["chartId"] = 0
        meta = doc.get("metadata") or {}
        for key in ("positions", "show_native_filters"):
            meta.pop(key, None)
    elif rel == "metadata.yaml":
        doc["timestamp"] = "2026-12-06T00:00:00+00:00"
    return doc


def unpack(export: str, bundle: str) -> None:
    with zipfile.ZipFile(export) as z:
        docs = {}
        for name in z.namelist():
            if not name.endswith(".yaml"):
                continue
            rel = name.split("/", 1)[1]
            if rel.startswith(("charts/", "dashboards/")):
                # Superset names these files after the object's id in this installation.
                rel = re.sub(r"_\d+\.yaml$", ".yaml", rel)
            docs[rel] = stable(rel, yaml.safe_load(io.TextIOWrapper(z.open(name), "utf-8")))
    if not any(rel.startswith("dashboards/") for rel in docs):
        sys.exit(f"{export} holds no dashboard: nothing written")
    for root, _, files in os.walk(bundle, topdown=False):
        for name in files:
            if os.path.relpath(os.path.join(root, name), bundle) not in docs:
                os.remove(os.path.join(root, name))
        if root != bundle and not os.listdir(root):
            os.rmdir(root)
    for rel, doc in sorted(docs.items()):
        path = os.path.join(bundle, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(doc, f, sort_keys=True, allow_unicode=True)
    print(f"wrote {len(docs)} files to {bundle}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "import":
        import_bundle(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "pack":
        pack(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "unpack":
        unpack(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
