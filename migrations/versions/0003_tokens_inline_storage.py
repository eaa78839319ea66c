"""user_email_tokens: keep a row's ciphertexts inline (toast_tuple_target 8160)

Every use of a token reads both ciphertexts and every refresh or key rotation
rewrites them. A Microsoft access token is a 1.5-2.5 KB JWT, so by default
PostgreSQL moves its ciphertext out of line (a failed pglz attempt on
random-looking base64, then a TOAST insert, index entry and delete per write, a
TOAST index lookup per read). Rows under ~8 KB now stay in the heap: `flask keys
rotate` over 100,000 Microsoft-sized rows went from 4,987 to 8,299 rows/s
(bench/crypto.py). Aggregates (health) read indexes, not these columns.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:20:00

"""
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE user_email_tokens SET (toast_tuple_target = 8160)")


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE user_email_tokens RESET (toast_tuple_target)")
