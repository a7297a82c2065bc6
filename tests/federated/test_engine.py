"""SQL engines: opening a SQLite database switches it to WAL even while another process holds its write lock."""

import sqlite3
import threading

from evoclone.federated.stores.engine import make_engine


def test_wal_is_set_on_a_new_database_while_another_connection_holds_the_write_lock(tmp_path):
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # a second worker creating the schema, still in the rollback journal
    release = threading.Timer(0.3, holder.execute, args=("COMMIT",))
    release.start()
    engine = make_engine(f"sqlite:///{path}")
    try:  # SQLite refuses the journal-mode change at once, without waiting, while the lock is held
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        release.join()
        holder.close()
        engine.dispose()

