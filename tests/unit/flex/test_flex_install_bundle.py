"""flex.install with a bundled runtime (--bundle) and the plugin-directory options, without building a bundle: the
launcher text, where it lands, and what the installer refuses. tests/integration/flex/test_bundle.py builds a real
bundle and runs kubelet's calls through it with the host's Python hidden."""
from __future__ import annotations

import json
import os
import shlex
import sys
import types

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from flex import bundle as B  # noqa: E402
from flex import install as I  # noqa: E402

MANIFEST = {"format": B.FORMAT, "python": "bin/python3", "loader": "lib/ld-linux-x86-64.so.2", "library_path": "lib",
            "app": "app"}


def fake_bundle(path) -> str:
    for rel in ("bin/python3", "bin/python3._pth", "lib/ld-linux-x86-64.so.2"):
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        open(os.path.join(path, rel), "w").close()
    with open(os.path.join(path, B.MANIFEST), "w") as f:
        json.dump(MANIFEST, f)
    return str(path)


def exec_argv(text: str) -> list[str]:
    line = next(ln for ln in text.split("\nexec ", 1)[1:])
    return shlex.split("exec " + line)


def test_bundle_launcher_starts_the_bundled_python_through_its_loader():
    text = I.bundle_launcher_text("/opt/tessera-flex", MANIFEST, "/etc/tessera/flex-config.yaml", "node-1",
                                  "/var/log/tessera-flex.log", "/run/tessera/flex-agent.sock")
    assert text.startswith("#!/bin/sh\n")
    argv = exec_argv(text)
    assert argv[:6] == ["exec", "/opt/tessera-flex/lib/ld-linux-x86-64.so.2", "--inhibit-cache", "--library-path",
                        "/opt/tessera-flex/lib", "/opt/tessera-flex/bin/python3"]
    assert argv[6:9] == ["-I", "-S", "-c"] and argv[-1] == "$@"
    code = argv[9]
    compile(code, "<launcher>", "exec")
    for value in ('"/opt/tessera-flex/app"', '"/etc/tessera/flex-config.yaml"', '"node-1"',
                  '"/var/log/tessera-flex.log"', '"/run/tessera/flex-agent.sock"'):
        assert value in code
    assert "site" not in code.split("from flex.shim")[0]  # sys.path comes from bin/python3._pth, not `site`
    # nothing names a host Python
    assert "/usr/lib/python3" not in text and "/usr/bin/python" not in text


def test_bundle_launcher_paths_come_from_the_destination_only():
    a = I.bundle_launcher_text("/opt/a", MANIFEST, "c", "n", "l")
    b = I.bundle_launcher_text("/srv/elsewhere/b", MANIFEST, "c", "n", "l")
    assert a.replace("/opt/a", "X") == b.replace("/srv/elsewhere/b", "X")
    with pytest.raises(ValueError, match="absolute"):
        I.bundle_launcher_text("opt/a", MANIFEST, "c", "n", "l")


def test_bundle_launcher_quotes_awkward_values():
    text = I.bundle_launcher_text("/opt/t flex", MANIFEST, "/etc/it's here.yaml", "nöde", "/var/log/$HOME`x`.log")
    argv = exec_argv(text)
    assert argv[1] == "/opt/t flex/lib/ld-linux-x86-64.so.2"
    code = argv[9].replace("from flex.shim import main\nsys.exit(main())\n", "")
    assert code.startswith("import os, sys\n")
    fake_os = types.SimpleNamespace(environ={}, write=os.write)
    fake_sys = types.SimpleNamespace(path=["/opt/t flex/app"], argv=["-c", "init"], exit=sys.exit)
    exec(compile(code.replace("import os, sys\n", ""), "<launcher>", "exec"), {"os": fake_os, "sys": fake_sys})
    env = fake_os.environ
    assert env == {"TESSERA_CONFIG": "/etc/it's here.yaml", "TESSERA_NODE_NAME": "nöde",
                   "TESSERA_FLEX_LOG": "/var/log/$HOME`x`.log"}


def test_install_with_a_bundle(tmp_path):
    view = fake_bundle(tmp_path / "host" / "opt" / "tessera-flex")
    plugins = tmp_path / "host" / "plugins"
    path = I.install(str(plugins), config="/etc/tessera/flex-config.yaml", node="n1", bundle="/opt/tessera-flex",
                     bundle_view=view)
    assert path == str(plugins / "volume" / "exec" / "tessera~block" / "block")
    text = open(path).read()
    assert "exec /opt/tessera-flex/lib/ld-linux-x86-64.so.2 " in text and str(tmp_path) not in text
    assert os.listdir(os.path.dirname(path)) == ["block"]
    # with the front door: block.py is the sh launcher it execs
    fast = tmp_path / "block-fast"
    fast.write_bytes(b"\x7fELF fake")
    path = I.install(str(plugins), node="n1", agent_socket="/run/s.sock", fast_launcher=str(fast),
                     bundle="/opt/tessera-flex", bundle_view=view)
    d = os.path.dirname(path)
    assert sorted(os.listdir(d)) == ["block", "block.agent", "block.py"]
    assert open(os.path.join(d, "block.py")).read().startswith("#!/bin/sh\n")
    assert os.access(os.path.join(d, "block.py"), os.X_OK)


def test_install_refuses_an_incomplete_bundle(tmp_path):
    view = fake_bundle(tmp_path / "b")
    os.unlink(os.path.join(view, "bin", "python3._pth"))
    with pytest.raises(FileNotFoundError, match="python3._pth"):
        I.install(str(tmp_path / "p"), bundle="/opt/b", bundle_view=view)
    with pytest.raises(B.BundleError, match="not a bundle"):
        I.install(str(tmp_path / "p"), bundle=str(tmp_path / "nothing"))
    assert not os.path.exists(tmp_path / "p")


def test_volume_plugin_dir_is_kubelets_flag_and_plugin_dir_holds_volume_exec(tmp_path):
    vpd = tmp_path / "var" / "lib" / "kubelet" / "volumeplugins"
    path = I.install(python="/usr/bin/python3", volume_plugin_dir=str(vpd))
    assert path == str(vpd / "tessera~block" / "block")
    path = I.install(str(tmp_path / "kubelet-plugins"), "/usr/bin/python3")
    assert path == str(tmp_path / "kubelet-plugins" / "volume" / "exec" / "tessera~block" / "block")


def test_cli_help_describes_the_plugin_dirs_correctly(capsys):
    with pytest.raises(SystemExit):
        I.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--plugin-dir PLUGIN_DIR the directory holding volume/exec" in out
    assert "kubelet's --volume-plugin-dir itself" in out
    assert "/usr/libexec/kubernetes/kubelet-plugins/volume/exec" in out
    with pytest.raises(SystemExit):
        I.main(["--plugin-dir", "/a", "--volume-plugin-dir", "/b"])


def test_cli_reads_the_bundle_where_copy_runtime_put_it(tmp_path, monkeypatch):
    src = fake_bundle(tmp_path / "image" / "flex-runtime")
    host = tmp_path / "host"
    seen = {}
    monkeypatch.setattr(B, "verify", lambda view, modules=None: seen.setdefault("verified", view))
    assert I.main(["--copy-runtime", src, str(host / "opt" / "tessera-flex"), "--volume-plugin-dir",
                   str(host / "vpd"), "--bundle", "/opt/tessera-flex", "--node-name", "n1"]) == 0
    assert seen["verified"] == str(host / "opt" / "tessera-flex")
    text = open(host / "vpd" / "tessera~block" / "block").read()
    assert "--library-path /opt/tessera-flex/lib /opt/tessera-flex/bin/python3" in text


def test_pth_keeps_the_host_out_and_the_project_first():
    lines = B._pth_lines("python3.11")
    assert all(ln.startswith("../") and "/usr" not in ln for ln in lines)
    assert lines.index("../app") < lines.index("../lib/site-packages") < lines.index("../lib/dist-packages")


def test_ldd_output_is_parsed(monkeypatch):
    out = ("/b/x.so:\n\tlinux-vdso.so.1 (0x00007ffd)\n\tlibrados.so.2 => /lib/x86_64-linux-gnu/librados.so.2 "
           "(0x00007f00)\n\tlibgone.so.1 => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f01)\n"
           "/b/y.so:\n\tstatically linked\n")

    class R:
        returncode = 1
        stdout = out
        stderr = ""
    monkeypatch.setattr(B.subprocess, "run", lambda *a, **k: R())
    needed, loaders, problems = B.ldd(["/b/x.so", "/b/y.so"])
    assert needed == {"librados.so.2": "/lib/x86_64-linux-gnu/librados.so.2"}
    assert loaders == {"/lib64/ld-linux-x86-64.so.2"}
    assert problems == ["/b/x.so: libgone.so.1 not found"]


def test_pip_closure_is_the_projects_runtime_requirements():
    import importlib.metadata as md
    try:
        project = md.distribution(B.PROJECT)
    except md.PackageNotFoundError:
        pytest.skip("MISSING: the project installed in this venv (pip install -e .)")
    names = {B._norm(d.metadata["Name"]) for d in B.pip_closure(B._requirements(project))}
    assert {"grpcio", "pydantic", "pydantic-core", "pyyaml", "protobuf"} <= names
    assert "kubernetes" not in names and "pytest" not in names  # extras are not the shim's


def test_cli_installs_nothing_from_a_missing_bundle(tmp_path, capsys):
    assert I.main(["--plugin-dir", str(tmp_path / "p"), "--bundle", str(tmp_path / "nothing")]) == 1
    assert "nothing installed" in capsys.readouterr().err and not os.path.exists(tmp_path / "p")
