"""CRIU's own conformance suite (zdtm) run through pycriu.

zdtm's test programs (``test/zdtm/static`` of CRIU's source) each set up some kernel state, become
a daemon, write a pidfile, wait for SIGTERM and then check the state and write ``PASS`` or ``FAIL``
to their ``.out`` file. This package starts them exactly as CRIU's ``zdtm.py`` does
(``make -C static NAME.pid``), in this host's namespaces (the ``h`` flavor) or in new ones (``ns``:
:mod:`pycriu.conformance.flavor`), checkpoints and restores them in one of several *modes*
(the ``criu`` CLI, :class:`pycriu.Criu`, or :class:`pycriu.Migration` to a local agent), then
sends SIGTERM and reads the verdict. When the CLI passes a test and a pycriu mode fails it,
that is a pycriu defect until CRIU's log says otherwise.

It lives in the package (not under ``tests/``) because it is a tool users run against their own
CRIU and kernel (``python -m pycriu.conformance``), not only a test of this repository;
``tests/test_conformance.py`` drives it for CI.
"""

from __future__ import annotations

from .flavor import FLAVORS, Flavor, HostFlavor, NsFlavor
from .suite import MODES, Outcome, ZdtmTest, default_zdtm_dir, eligible, load_tests, run_trial

__all__ = ["FLAVORS", "MODES", "Flavor", "HostFlavor", "NsFlavor", "Outcome", "ZdtmTest", "default_zdtm_dir",
           "eligible", "load_tests", "run_trial"]
