# Superset's configuration for cdc-lake's dashboards (tools/superset). Loopback only: the
# metadata is a SQLite file in the run directory, the secrets come from files tools/superset
# generates there, and the browser is told (content-security policy) to load nothing from
# outside the server, which drops the frontend's telemetry image and the map-tile hosts.
import os

_STATE = os.environ["CDC_LAKE_SUPERSET_STATE"]

with open(os.path.join(_STATE, "secret-key"), encoding="utf-8") as _f:
    SECRET_KEY = _f.read().strip()

SQLALCHEMY_DATABASE_URI = (
    "sqlite:///" + os.path.join(_STATE, "superset.db") + "?check_same_thread=false"
)

# Nothing that reaches outside the machine.
SCARF_ANALYTICS = False
MAPBOX_API_KEY = ""
TALISMAN_ENABLED = True
TALISMAN_CONFIG = {
    "content_security_policy": {
        "base-uri": ["'self'"],
        "default-src": ["'self'"],
        "img-src": ["'self'", "blob:", "data:"],
        "worker-src": ["'self'", "blob:"],
        "connect-src": ["'self'"],
        "object-src": "'none'",
        "style-src": ["'self'", "'unsafe-inline'"],
        "font-src": ["'self'", "data:"],
        "script-src": ["'self'", "'strict-dynamic'"],
    },
    "content_security_policy_nonce_in": ["script-src"],
    "force_https": False,
    "session_cookie_secure": False,
}
TALISMAN_DEV_CONFIG = TALISMAN_CONFIG

# Chart data is always read fresh from the analytics views (no result cache), so a dashboard
# shows what the pod has applied.
CACHE_CONFIG = {"CACHE_TYPE": "NullCache"}
DATA_CACHE_CONFIG = {"CACHE_TYPE": "NullCache"}
