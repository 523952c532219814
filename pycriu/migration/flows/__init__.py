"""The migration flows: which side runs what, which channel carries the pages, what touches disk.

=======================  ==========================================  ============================
flow                     pages travel                                pages written to disk
=======================  ==========================================  ============================
classic                  as ``pages-*.img`` files over the control    source and destination
                         channel, after the dump
page-server              CRIU dump -> CRIU page server on the         destination only
                         destination, during the dump
lazy                     frozen source's CRIU (from memory) ->        neither (except the few
                         lazy-pages daemon on the destination,        non-lazy pages: stack,
                         after the destination resumed                vDSO, file-backed)
page-server-on-source    ``criu page-server --lazy-pages`` on the     source only (plus the
                         source (from its local dump) -> lazy-pages   non-lazy pages, sparse, on
                         daemon, after the destination resumed        the destination)
pre-copy                 pre-dumps then the final dump -> page        destination only
                         server on the destination
hybrid                   pre-dumps -> destination page server,        destination (pre-copied
                         then the rest lazily from the frozen source  pages only)
=======================  ==========================================  ============================

The rollback point is the ``commit`` message. Between two hosts every flow dumps with
``leave_stopped`` (on one host, classic, page-server and page-server-on-source end the source at
the dump instead, its images being the rollback, and restore after the dump returned:
:mod:`pycriu.migration.rollback`), and the destination restores with its tree held stopped until
the commit (the agent resumes it then), so that at no time do two copies run. The classic,
page-server, pre-copy and page-server-on-source flows restore on the destination *inside* CRIU's
``post-dump`` notification: a failure before the commit is sent answers post-dump with failure
(CRIU resumes the source) and has the agent kill its copy; once the commit is sent post-dump
answers success whatever happens (the source stays stopped), and the source is killed when the
agent acknowledged the commit, or left stopped when the acknowledgement never came (outcome
``unknown``). The lazy flows must answer ``post-dump`` at once (CRIU serves the pages only
afterwards); the source stays stopped until the destination reports that every page arrived; it
is then killed, or resumed if the destination failed.

Each flow is one module holding one :class:`~.base.Flow` subclass (its ``FLOW``); what it needs
(lazy pages, memory tracking) and where its images live is its
:class:`~pycriu.migration.modes.FlowSpec`, the one description that ``auto``, the agent and
``pycriu doctor`` read. A new flow is one new module and one line in
:data:`pycriu.migration.modes.FLOWS`.
"""

from __future__ import annotations

from .base import Flow, FlowContext, FlowResult

__all__ = ["Flow", "FlowContext", "FlowResult"]
