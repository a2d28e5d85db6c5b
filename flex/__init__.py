"""FlexVolume support: the kubelet-driven shim (`flex.shim`, installed as `tessera~block/block`) and the dynamic
provisioner (`flex.provisioner`). Both reuse the CSI plugin's node and controller code; nothing here re-implements
storage logic."""
