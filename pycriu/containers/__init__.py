"""Containers as a workload: the CRIU options a container runtime passes, as one typed object
(:class:`ContainerOptions`), and real OCI containers of runc (:class:`RuncContainer`), whose
options pycriu derives itself the way runc does. See ``docs/containers.rst``."""

from __future__ import annotations

from .options import DESCRIPTORS_FILE, ContainerMount, ContainerOptions, ExternalNamespace, bind_root
from .runc import Runc, RuncBundle, RuncContainer, RuncError, RuncTarget

__all__ = ["ContainerOptions", "ContainerMount", "ExternalNamespace", "bind_root", "DESCRIPTORS_FILE",
           "Runc", "RuncBundle", "RuncContainer", "RuncError", "RuncTarget"]
