"""Store interfaces shared by the services, each with an embedded default and a production backend."""


def create_tables(meta, engine) -> None:
    """`meta.create_all`, tolerating another process creating the same tables at the same moment.

    SQLAlchemy checks for each table and then creates it; two processes opening a new
    site database together (a SuperNode and a ClientApp, say) can both see it missing.
    """
    import sqlalchemy as sa

    try:
        meta.create_all(engine)
    except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError) as exc:
        if "exist" not in str(exc).lower() and "duplicate" not in str(exc).lower():
            raise
        meta.create_all(engine)  # the other process won: every table is there (checkfirst)
