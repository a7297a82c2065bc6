"""Twin reviews encrypted at rest, and feedback usage recorded per training round.

Each queued batch of twins gets a data key (the `data_key` table patients use, wrapped by the
site's master key) and every twin's events and outcome are sealed with AES-256-GCM, bound to
its pseudonym. Rows written before this revision keep their plaintext `twin_json` until the
site next opens its store with the keyring (`evoclone site migrate`, ingest, export or the
site API's start), which seals them and clears the plaintext (review.seal_legacy_reviews).
`used_in`/`used_at` go: which round used which verdict lives in `feedback_use`, written by
the ClientApp (federated.stores.feedback).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the sealed columns, make the plaintext column nullable, drop the per-run marks."""
    with op.batch_alter_table("twin_review") as batch:
        batch.add_column(sa.Column("data_key_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("twin_sealed", sa.LargeBinary(), nullable=True))
        batch.alter_column("twin_json", existing_type=sa.Text(), nullable=True)
        batch.create_foreign_key("fk_twin_review_data_key", "data_key", ["data_key_id"], ["id"])
        batch.drop_index("ix_twin_review_used_in")
        batch.drop_column("used_in")
        batch.drop_column("used_at")


def downgrade() -> None:
    """Refused by design: going below 0004 would mean writing decrypted twins back into the database."""
    raise RuntimeError("downgrading below 0004 would store twins in plaintext; restore the backup taken before "
                       "the upgrade instead (evoclone site migrate --backup)")
