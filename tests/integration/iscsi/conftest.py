"""iSCSI host-test fixtures live in tests/integration/iscsi/tgt.py (importable by the tests); pytest sees them here."""
from tests.integration.iscsi.tgt import backend, tgtd  # noqa: F401
