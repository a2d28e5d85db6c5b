"""Every configuration the project ships, validated by `tessera-csi config validate` inside the built image, as the
image's user: the ConfigMaps' config.yaml of every kustomization under deploy/kubernetes (after its patches), and
the chart's rendered ConfigMap for every deploy/helm/values-*.yaml (found and rendered as tests/deploy does)."""
from __future__ import annotations

import copy

import pytest

from tests.deploy import k8s  # skips this module with MISSING: when kubernetes-validate / helm-python-sdk are absent
from tests.deploy.checks import configmaps_of
from tests.deploy.test_chart import CASES as CHART_CASES
from tests.image.rootfs import Container

pytestmark = pytest.mark.timeout(2400)  # the first test may wait for the image build (tests/image/build.py)


def shipped_configs() -> dict[str, str]:
    """case id -> config.yaml text."""
    out: dict[str, str] = {}
    for kfile in sorted(k8s.KUBE_DIR.rglob("kustomization.yaml")):
        flavour = kfile.parent.relative_to(k8s.KUBE_DIR)
        for name, text in configmaps_of(k8s.kustomize_build(kfile.parent)).items():
            out[f"kubernetes/{flavour}/{name}"] = text
    for case, values in sorted(CHART_CASES.items()):  # the chart's defaults and each values file, with the
        for name, text in configmaps_of(k8s.render_chart(copy.deepcopy(values))).items():  # --set-string its
            out[f"helm/{case}/{name}"] = text                                             # documented command adds
    return out


CONFIGS = shipped_configs()


def test_configs_found():
    kinds = {case.split("/")[0] for case in CONFIGS}
    assert kinds == {"kubernetes", "helm"}, sorted(CONFIGS)
    cases = {c.split("/")[1] for c in CONFIGS if c.startswith("helm/")}
    assert cases == {"default"} | {f"values-{t}" for t in k8s.values_files()}, sorted(CONFIGS)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_shipped_config_validates_in_the_image(container: Container, case: str, tmp_path):
    src = tmp_path / "config.yaml"
    src.write_text(CONFIGS[case])
    inside = container.copy_in(src, f"/tmp/shipped-configs/{case.replace('/', '_')}.yaml")
    r = container.run(["config", "validate", inside])
    assert r.returncode == 0, f"{case}: `tessera-csi config validate` in the image failed ({r.returncode}):\n" \
                              f"{r.stdout}{r.stderr}"
