"""Dynamic provisioning for Tessera FlexVolume PVs: a controller that turns PVCs of our StorageClasses into volumes
(through csi.controllerops, the CSI controller's own code) and PVs whose flexVolume source names `tessera/block`.

decide.py is pure (objects in, decisions out) and carries the rules; kube.py talks to the API server; leader.py is
Lease-based leader election; controller.py runs the loop; __main__.py is the command line."""
