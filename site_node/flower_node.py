"""The site's guarded Flower SuperNode: Flower's own SuperNode plus the site's app approval check.

Run as `python -m evoclone.site_node.flower_node <flower-supernode args>` with
`--node-config FILE` (`start_supernode` does); the site database comes from that file. Before the SuperNode accepts the first message of a run, it
looks the run's FAB hash up in the site's approvals (`site_node.approvals`); a run of a
bundle the site has not approved gets an INVALID_FAB error reply, exactly like Flower's
own failed bundle verification, no ClientApp starts, no data is read, and the refusal is
recorded in the site's database and log.

Flower has no public hook for this check, so the guard wraps the SuperNode's internal
`_pull_and_store_message` (flwr is pinned; `tests/site_node/test_flower_node.py` runs
the guard against real SuperLink and SuperNode processes to catch an upstream change).
"""

from __future__ import annotations

import logging
import sys

from .approvals import ApprovalStore

log = logging.getLogger("evoclone.site.approval")


def install_guard(url: str) -> None:
    """Make this process's Flower SuperNode refuse runs of unapproved bundles."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore import log as flwr_log
    from flwr.supernode import start_client_internal as sci

    store = ApprovalStore(url=url)
    original = sci._pull_and_store_message

    def guarded(**kw):
        state, object_store, receive, get_run = kw["state"], kw["object_store"], kw["receive"], kw["get_run"]
        refused: list[int] = []

        def receive_checked():
            recv = receive()
            if recv is None:
                return None
            message, _tree = recv
            run_id = message.metadata.run_id
            if state.get_run(run_id) is None:
                run = get_run(run_id)
                if not store.is_approved(run.fab_hash):
                    store.log_refusal(run_id=str(run_id), fab_hash=run.fab_hash, fab_id=run.fab_id)
                    flwr_log(logging.ERROR, "run %s refused: app bundle %s (sha256 %s) is not approved at this "
                             "site; a site admin approves it with `evoclone site approve %s`",
                             run_id, run.fab_id, run.fab_hash, run.fab_hash)
                    reason = (f"refused by the site: app bundle sha256 {run.fab_hash} is not approved "
                              "(evoclone site approve)")
                    sci._insert_message(Message(Error(ErrorCode.INVALID_FAB, reason), reply_to=message),
                                        state, object_store)
                    refused.append(run_id)
                    return None
            return recv

        result = original(**{**kw, "receive": receive_checked})
        return result if result is not None else (refused[0] if refused else None)

    sci._pull_and_store_message = guarded


def start_zygote() -> None:
    """Start the warm ClientApp zygote and put its shim first on this process's PATH."""
    import os
    import shutil

    from .clientapp_zygote import prepare, start

    real = shutil.which("flwr-clientapp")
    if real is None:
        return
    sock, env = prepare(real)
    os.environ.update(env)
    start(sock, os.getpid())


def main(argv: list[str] | None = None) -> None:
    """Entry point: flower-supernode's arguments; `--node-config FILE` names the site database."""
    from pathlib import Path

    from .supernode import node_config_db

    args = list(sys.argv[1:] if argv is None else argv)
    i = args.index("--node-config") if "--node-config" in args else -1
    if i < 0 or i + 1 >= len(args) or not Path(args[i + 1]).is_file():
        raise SystemExit("error: --node-config FILE is required (written by `evoclone site node`)")
    install_guard(node_config_db(Path(args[i + 1])))
    import os

    from .flower_tuning import apply_supernode

    apply_supernode()
    if os.environ.get("EVOCLONE_CLIENTAPP_ZYGOTE", "1") != "0":
        start_zygote()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
