"""Host-side pieces of the real-kernel harness that need no guest: junit summaries, the suite registry, the QEMU
initramfs (a real newc archive that cpio can list) and module dependency order, the UML workaround decision."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e import suites
from tests.e2e.junitsum import read_junit

E2E = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "e2e")
sys.path.insert(0, E2E)
import guest  # noqa: E402
import qemu_boot  # noqa: E402


def test_read_junit_counts_and_messages(tmp_path) -> None:
    path = tmp_path / "j.xml"
    path.write_text("""<testsuites><testsuite name="x">
      <testcase classname="a" name="ok"/>
      <testcase classname="a" name="bad"><failure message="assert 1 == 2">trace</failure></testcase>
      <testcase classname="a" name="boom"><error message="fixture died"/></testcase>
      <testcase classname="a" name="skip"><skipped message="MISSING: dm"/></testcase>
    </testsuite></testsuites>""")
    s = read_junit(str(path))
    assert (s.tests, s.passed) == (4, 1)
    assert s.failures == ["a::bad: assert 1 == 2"] and s.errors == ["a::boom: fixture died"]
    assert s.skipped == ["a::skip: MISSING: dm"]
    assert s.line() == "4 tests: 1 passed, 1 failed, 1 errors, 1 skipped"
    assert s.detail == "a::bad:\nassert 1 == 2\ntrace"


def test_read_junit_detail_prefers_the_dead_plugin(tmp_path) -> None:
    """A crash of the plugin fails many tests; the host must show the one carrying the plugin's last log lines."""
    path = tmp_path / "j.xml"
    path.write_text("""<testsuites><testsuite name="x">
      <testcase classname="a" name="first"><failure message="UNAVAILABLE">grpc trace</failure></testcase>
      <testcase classname="a" name="second"><error message="the plugin process died during this test:">
    line one
    terminate called: ceph_assert</error></testcase>
    </testsuite></testsuites>""")
    s = read_junit(str(path))
    assert s.detail.startswith("a::second:\nthe plugin process died") and "ceph_assert" in s.detail


def test_suite_registry_selection(monkeypatch) -> None:
    names = [s.name for s in suites.SUITES]
    assert "lvm-data" in names and "sanity-lvm" in names and len(set(names)) == len(names)
    monkeypatch.setenv("TESSERA_E2E_SUITES", "lvm-data")
    assert [s.name for s in suites.selected()] == ["lvm-data"]
    monkeypatch.setenv("TESSERA_E2E_SUITES", "nope")
    with pytest.raises(ValueError, match="unknown suites"):
        suites.selected()


@pytest.mark.skipif(not os.path.exists("/bin/busybox") or not shutil.which("cpio"), reason="MISSING: busybox/cpio")
def test_qemu_initramfs_is_a_valid_cpio_with_module_deps_first(tmp_path) -> None:
    try:
        version = qemu_boot.kernel_version()
    except FileNotFoundError:
        pytest.skip("MISSING: linux-image-amd64")
    order = qemu_boot._module_order(version, qemu_boot.STAGE0_MODULES)
    names = [os.path.basename(p).split(".ko")[0] for p in order]
    assert names.index("9pnet") < names.index("9pnet_virtio") < names.index("9p")
    assert names[-1] == "overlay"
    path = tmp_path / "i.cpio"
    qemu_boot.build_initramfs(version, str(path))
    listing = subprocess.run(["cpio", "-it"], stdin=open(path, "rb"), capture_output=True, text=True, check=True)
    files = listing.stdout.split()
    assert "init" in files and "bin/busybox" in files and "modules/order" in files
    assert f"modules/{os.path.basename(order[0])}" in files


def test_uml_xstate_mode_override(monkeypatch) -> None:
    import guest
    monkeypatch.setenv("TESSERA_UML_XSTATE", "native")
    assert guest.uml_needs_fxsr() is False
    monkeypatch.setenv("TESSERA_UML_XSTATE", "fxsr")
    assert guest.uml_needs_fxsr() is True
    monkeypatch.delenv("TESSERA_GUEST", raising=False)
    assert guest.choose_kind() == "uml"
    with pytest.raises(guest.GuestError):
        guest.choose_kind("vmware")


def test_plan_lanes_balances_and_keeps_every_suite(monkeypatch) -> None:
    s = [suites.Suite(n, (), expected=e) for n, e in (("a", 500), ("b", 300), ("c", 250), ("d", 100), ("e", 60))]
    lanes = suites.plan_lanes(s, 2)
    assert sorted(x.name for lane in lanes for x in lane) == ["a", "b", "c", "d", "e"]
    loads = sorted(sum(x.expected for x in lane) for lane in lanes)
    assert loads == [600, 610]  # longest first, each to the lighter lane: a+d, b+c+e
    assert all([x.name for x in lane] == sorted(x.name for x in lane) for lane in lanes)  # registry order kept
    assert suites.plan_lanes(s, 1) == [s] and len(suites.plan_lanes(s[:1], 4)) == 1
    monkeypatch.setenv("TESSERA_E2E_LANES", "0")
    with pytest.raises(ValueError):
        suites.lane_count()
    monkeypatch.setenv("TESSERA_E2E_LANES", "3")
    assert suites.lane_count() == 3


def test_exposed_dirs_only_under_guest_tmpfs(monkeypatch) -> None:
    """A checkout under /tmp (a CI clone) is hidden by the guest's own /tmp unless exposed; one elsewhere is seen
    through the overlay root already."""
    g = guest
    monkeypatch.setattr(g, "HERE", "/tmp/ci-clone/tests/e2e")
    monkeypatch.setattr(g.sys, "prefix", "/tmp/ci-clone/.venv")
    assert g.exposed_dirs("/tmp/ci-clone") == ["/tmp/ci-clone"]  # the venv and cwd inside it need nothing more
    assert g.exposed_dirs("/run/other") == ["/run/other", "/tmp/ci-clone"]
    monkeypatch.setattr(g, "HERE", "/work/main/tests/e2e")
    monkeypatch.setattr(g.sys, "prefix", "/work/main/.venv")
    assert g.exposed_dirs("/work/main") == []
    monkeypatch.setattr(g, "HERE", "/tmp/a b/tests/e2e")
    with pytest.raises(g.GuestError, match="space or colon"):
        g.exposed_dirs("/work")


def test_a_hung_boot_is_retried_once_then_reported(tmp_path, monkeypatch) -> None:
    """A fake guest (a shell command standing in for linux.uml) that never gets ready the first time and works the
    second: the run succeeds and keeps the hung console; hanging twice is a failure that says so."""
    import io
    marker = tmp_path / "booted-once"

    def fake_argv(shared, workdir, disks, mem_mb, fxsr, extra=()):
        # first boot of each run: hang; the next: get ready and report rc 0 (HANG_ALWAYS: hang every time)
        ready = f"echo 'tessera-guest: ready after 0.1s'; echo '{{\"rc\": 0}}' > {shared}/status.json"
        return ["sh", "-c", f'if [ -e {marker} ] && [ -z "$HANG_ALWAYS" ]; then {ready}; '
                            f'else touch {marker}; echo booting; sleep 30; fi']

    monkeypatch.setattr(guest, "_uml_argv", fake_argv)
    monkeypatch.setattr(guest, "uml_needs_fxsr", lambda: False)
    out = io.StringIO()
    r = guest.run_in_guest(["true"], shared_dir=str(tmp_path / "a"), kind="uml", boot_timeout=1.5, timeout=5,
                           stream=out)
    assert r.ok, out.getvalue()
    assert "boot attempt 1 hung" in out.getvalue() and (tmp_path / "a" / "console-boot1.log").exists()
    monkeypatch.setenv("HANG_ALWAYS", "1")
    r = guest.run_in_guest(["true"], shared_dir=str(tmp_path / "b"), kind="uml", boot_timeout=1.5, timeout=5,
                           stream=io.StringIO())
    assert not r.ok and "did not get ready" in r.error and (tmp_path / "b" / "console-boot1.log").exists()


def test_a_silent_guest_is_killed_and_dots_count_as_speech(tmp_path, monkeypatch) -> None:
    """A fake guest (a shell command standing in for linux.uml). One that prints pytest-style progress dots without
    a newline for longer than the silence limit is left alone; one that gets ready and then says nothing is killed
    by the watchdog, and the result says the guest stalled (not the command)."""
    import io
    import time

    def fake_argv(shared, workdir, disks, mem_mb, fxsr, extra=()):
        ready = "echo 'tessera-guest: ready after 0.1s'"
        done = f"echo '{{\"rc\": 0}}' > {shared}/status.json"
        if os.environ.get("FAKE_SILENT"):
            return ["sh", "-c", f"{ready}; printf ..; sleep 30; {done}"]
        return ["sh", "-c", f"{ready}; for i in 1 2 3 4 5 6; do printf .; sleep 0.5; done; echo; {done}"]

    monkeypatch.setattr(guest, "_uml_argv", fake_argv)
    monkeypatch.setattr(guest, "uml_needs_fxsr", lambda: False)
    out = io.StringIO()
    r = guest.run_in_guest(["true"], shared_dir=str(tmp_path / "a"), kind="uml", boot_timeout=5, timeout=20,
                           stream=out, silence_limit=1.5)
    assert r.ok and not r.stalled, out.getvalue()
    assert "......" in out.getvalue()
    monkeypatch.setenv("FAKE_SILENT", "1")
    t0 = time.monotonic()
    r = guest.run_in_guest(["true"], shared_dir=str(tmp_path / "b"), kind="uml", boot_timeout=5, timeout=60,
                           stream=io.StringIO(), silence_limit=1.5)
    assert r.stalled and not r.ok and "silent for 2s" in r.error, r.error
    assert time.monotonic() - t0 < 25, "killed by the watchdog, not by the fake guest's end"  # bound, not speed
