"""In-guest iSCSI fixtures live in env.py (importable by the tests); pytest sees them here."""
from tests.e2e.inguest.iscsi.env import iscsi, iscsi_server  # noqa: F401
